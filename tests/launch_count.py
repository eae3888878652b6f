"""Count the kernels a piece of code launches, on CPU: every Triton launch (through the interpreter) plus every torch
op that would be a kernel on a GPU (views and allocations are not; what the Triton interpreter does inside a launch
is not counted)."""

from __future__ import annotations

import contextlib

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch nothing: allocations (a GPU allocation is no kernel) and metadata
NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "lift_fresh_copy", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense", "set_", "resize_", "detach_"}


@contextlib.contextmanager
def interpreter_launches(on_launch):
    """Patch the Triton interpreter's launch: `on_launch(run, fn, args, kwargs)` sees each launch (not a warm-up, not
    one inside another launch) before it runs, and returns whether to run it (`run` is the unpatched launch, kwargs
    hold grid and warmup). Yields a list whose length is the number of launches running now: torch ops dispatched
    meanwhile are the interpreter's, not kernels."""
    from triton.runtime.interpreter import InterpretedFunction

    run, inside = InterpretedFunction.run, []

    def hooked_run(fn, *args, grid, warmup, **kwargs):
        if not inside and not warmup and not on_launch(run, fn, args, dict(kwargs, grid=grid, warmup=warmup)):
            return None
        inside.append(fn)
        try:
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            inside.pop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InterpretedFunction, "run", hooked_run)
        yield inside


class LaunchCounter(TorchDispatchMode):
    """`with LaunchCounter() as c:` ... then c.events is the list of launches in order: "triton:<kernel>" or
    "torch:<op>"."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._inside_triton: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside_triton and not func.is_view and name not in NO_KERNEL:
            self.events.append(f"torch:{name}")
        return func(*args, **(kwargs or {}))

    def _launched(self, run, fn, args, kwargs) -> bool:
        self.events.append(f"triton:{fn.fn.__name__}")
        return True

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._inside_triton = self._stack.enter_context(interpreter_launches(self._launched))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()


def decode_layer_launches(llm, prompt: list[int], params) -> list[list[str]]:
    """The launches of every decoder layer during the decode steps of generating `prompt` with `params` (one list
    per layer and step, in order)."""
    model = llm.model
    layer_fn = model._layer
    per_layer: list[list[str]] = []

    def counted(layer, x, k_cache, v_cache, meta):
        start = len(counter.events)
        out = layer_fn(layer, x, k_cache, v_cache, meta)
        if not meta.is_prefill:
            per_layer.append(counter.events[start:])
        return out

    with pytest.MonkeyPatch.context() as patch, LaunchCounter() as counter:
        patch.setattr(model, "_layer", counted)
        llm.generate([prompt], params)
    assert per_layer, "no decode step ran"
    return per_layer
