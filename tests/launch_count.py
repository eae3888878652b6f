"""Count the kernels a piece of code launches, on CPU: every Triton launch (through the interpreter) plus every torch
op that would be a kernel on a GPU (views and allocations are not; what the Triton interpreter does inside a launch
is not counted)."""

from __future__ import annotations

import contextlib

from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch nothing: allocations (a GPU allocation is no kernel) and metadata
NO_KERNEL = {"empty", "empty_strided", "empty_like", "lift_fresh", "lift_fresh_copy", "sym_size", "sym_stride",
             "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense", "set_", "resize_", "detach_"}


class LaunchCounter(TorchDispatchMode):
    """`with LaunchCounter() as c:` ... then c.events is the list of launches in order: "triton:<kernel>" or
    "torch:<op>"."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self._inside_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside_triton and not func.is_view and name not in NO_KERNEL:
            self.events.append(f"torch:{name}")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def _patched_triton(self):
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run
        counter = self

        def counted_run(fn, *args, grid, warmup, **kwargs):
            if not warmup:
                counter.events.append(f"triton:{fn.fn.__name__}")
            counter._inside_triton += 1
            try:
                return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter._inside_triton -= 1

        InterpretedFunction.run = counted_run
        try:
            yield
        finally:
            InterpretedFunction.run = run

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._patched_triton())
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()
