"""CUDA graphs emulated on CPU, so that ModelRunner's real capture code (capture, capture_prefill, capture_logprobs,
capture_all) runs in the CPU suite with a graph's semantics, not a re-run of the Python:

- capture records every kernel the code launches and runs none of them, as on a GPU: each Triton launch (through the
  interpreter) with its arguments as they were (tensors by identity, Python numbers frozen), and each torch op that
  is a kernel with its input and output tensors. An op's outputs are sized from its meta kernel and allocated
  unwritten, like everything allocated inside a capture: NaN (integers: their minimum, or maximum if unsigned), and
  an in-place op leaves its tensor as it was. So code that reads what a capture computed without a replay, or counts
  on a capture's side effect, reads garbage here too;
- replay runs those kernels on the same tensors, in order, and nothing else: a value the Python computed on the host
  at capture stays what it was then, a host-side effect inside the capture is not repeated, a tensor allocated inside
  the capture keeps its identity (as its address in the graph's pool);
- inside a capture, whatever would fail or silently break a real one fails at once: reading a device value on the
  host (.item(), bool(), int(), .tolist(), .numpy(), torch.equal), ops whose output size depends on the data
  (nonzero, boolean-mask indexing, unique, repeat_interleave without output_size, bincount), building a tensor from
  host data (torch.tensor: a copy the stream would wait for), torch.cuda.synchronize, and any kernel or op reading
  or writing the runner's host memory (its staging and pinned buffers, numpy arrays, read-back buffers: on a GPU a
  kernel cannot address them, and a copy from them inside a capture is frozen or illegal).

The runner's graphs share one memory pool. A tensor that one capture allocates and another graph reads (the
forward's logits, read by the sampler graphs) must stay referenced by the runner: on a GPU, once its last reference
goes, the pool may hand its memory to a later capture while both graphs still use it. Here every recorded tensor
stays alive, so leaving the emulation checks each such tensor against what the runner's attributes reference, through
dicts, lists, tuples and qwen2rt objects (`unheld_outputs`).

What it cannot see: other cross-device copies (everything is on the CPU here), and the pool's reuse itself: no two
graphs share memory here, so a graph replayed out of order over memory another graph's temporaries reuse shows
nothing. tests/test_gpu.py captures real graphs.

    with EmulatedCudaGraphs(runner) as graphs:   # runner: a CPU ModelRunner; use_graphs turned on
        runner.capture_all() / llm.generate(...)
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from launch_count import NO_KERNEL, interpreter_launches
from qwen2rt.model_runner import Staged

# ops that read a device value on the host or whose output size depends on the data: a sync, illegal in a capture
HOST_SYNC = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "argwhere", "masked_select", "unique",
             "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "masked_scatter", "allclose",
             "lift_fresh", "lift_fresh_copy"}


class CaptureError(AssertionError):
    """The code inside an emulated capture did what a real CUDA graph capture cannot do."""


def _capture_violation(func, args, kwargs) -> str | None:
    name = func.overloadpacket.__name__
    if name in HOST_SYNC:
        return f"{name} reads device data on the host (or builds a tensor from host data)"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return f"{name} with a boolean mask: its size depends on the data"
    if name == "repeat_interleave" and kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None) \
            and any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in args[1:2]):
        return "repeat_interleave with tensor repeats and no output_size"
    return None


def _tensors(value) -> list[torch.Tensor] | None:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return None


def _aliases(out, args) -> bool:
    """Whether every tensor of `out` lies in the storage of a tensor argument: a view. An op whose schema may alias
    (Tensor.to, reshape; seen undecomposed under inference mode) returns its input or a copy, which is a kernel."""
    storages = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    outs = _tensors(out)
    return outs is not None and all(o.untyped_storage().data_ptr() in storages for o in outs)


def host_ranges(runner) -> list[tuple[int, int, str]]:
    """The memory the runner keeps on the host, as (start, end, name): every numpy array it (or one of its Staged
    buffers) holds, and its tensors named _host*, _staged*, _pinned* (on a GPU machine the pinned and pageable
    buffers; here every tensor is on the CPU, so the names tell them from the device's)."""
    ranges = []

    def visit(value, name):
        if isinstance(value, np.ndarray) and value.nbytes:
            ranges.append((value.ctypes.data, value.ctypes.data + value.nbytes, name))
        elif isinstance(value, torch.Tensor):
            if name.split(".")[-1].split("[")[0].startswith(("_host", "_staged", "_pinned")) and value.numel():
                ranges.append((value.data_ptr(), value.data_ptr() + value.numel() * value.element_size(), name))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(v, f"{name}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(v, f"{name}[{k!r}]")

    for attr, value in vars(runner).items():
        if isinstance(value, Staged):
            for sub, v in vars(value).items():
                visit(v, f"{attr}.{sub}")
        else:
            visit(value, attr)
    return ranges


def _flat_tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _flat_tensors(v)


def poison(t: torch.Tensor) -> None:
    """Fill `t` as memory that a capture allocated and no kernel has written yet: NaN; integers their minimum (their
    maximum if unsigned), which no index, length or token id can be; booleans True."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        info = torch.iinfo(t.dtype)
        t.fill_(info.min if info.min < 0 else info.max)


def _storage(t: torch.Tensor) -> int | None:
    """Its storage's address; None when it has no bytes (every empty storage is at 0)."""
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


def _not_run(func, args, kwargs):
    """What `func` returns inside a capture, without running it: its outputs sized by its meta kernel and allocated
    poisoned; an output that is one of its arguments (an in-place or out= op) is that argument, unchanged."""
    real, device = {}, kwargs.get("device")

    def to_meta(a):
        if not isinstance(a, torch.Tensor):
            return a
        m = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="meta")
        real[id(m)] = a
        return m

    meta_args, meta_kwargs = tree_map(to_meta, args), tree_map(to_meta, kwargs)
    if device is not None:
        meta_kwargs["device"] = "meta"
    elif real:
        device = next(iter(real.values())).device
    try:
        out = func(*meta_args, **meta_kwargs)
    except NotImplementedError as e:
        raise NotImplementedError(f"the emulated capture sizes each op's outputs with its meta kernel: {func} has "
                                  f"none ({e})") from e

    def allocated(m):
        if not isinstance(m, torch.Tensor):
            return m
        if id(m) in real:
            a = real[id(m)]
            if a.shape != m.shape or a.stride() != m.stride():  # an out= argument the op would resize: reallocate
                raise CaptureError(f"inside a CUDA graph capture: {func} resizes its output {list(a.shape)} -> "
                                   f"{list(m.shape)} (a new allocation, at every replay)")
            return a
        t = torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
        poison(t)
        return t
    return tree_map(allocated, out)


class RecordingGraph:
    """Stands in for torch.cuda.CUDAGraph: the kernels recorded by its capture, replayed in order."""

    def __init__(self):
        self.kernels: list = []  # ("torch", func, args, kwargs, outputs) or ("triton", run, fn, args, kwargs)
        self.captured = False

    def pool(self):
        return ("emulated pool", id(self))

    def replay(self) -> None:
        assert self.captured, "replay of a graph that was never captured"
        with torch.inference_mode():  # a real replay ignores autograd; inference tensors may be written here
            for kernel in self.kernels:
                if kernel[0] == "triton":
                    _, run, fn, args, kwargs = kernel
                    run(fn, *args, **kwargs)
                    continue
                _, func, args, kwargs, outputs = kernel
                new = _tensors(func(*args, **kwargs)) or []  # None: an in-place op with no result
                for old, value in zip(outputs, new, strict=True):
                    if value is not old and value.data_ptr() != old.data_ptr():
                        old.copy_(value)  # the kernel's output goes where the captured one went


class _Recorder(TorchDispatchMode):
    def __init__(self, emulator: "EmulatedCudaGraphs", graph: RecordingGraph):
        super().__init__()
        self.emulator, self.graph = emulator, graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.emulator.inside_triton:  # the interpreter's own ops (no launch runs inside a capture)
            return func(*args, **kwargs)
        problem = _capture_violation(func, args, kwargs) or self.emulator.host_access(args, kwargs.values())
        if problem:
            raise CaptureError(f"inside a CUDA graph capture: {func} -- {problem}")
        name = func.overloadpacket.__name__
        inputs = list(_flat_tensors([args, kwargs.values()]))
        if name in NO_KERNEL:  # metadata or an allocation, which a capture does: unwritten memory
            out = func(*args, **kwargs)
            if name.startswith("empty") and not any(out is a for a in inputs):
                poison(out)
                self.emulator.allocated(out)
            return out
        if func.is_view:
            out = func(*args, **kwargs)
            if _aliases(out, args):
                return out  # a view: nothing to run again
            for t in _tensors(out) or ():  # an op that may alias made a copy: a kernel, which the capture does not run
                poison(t)
        else:
            out = _not_run(func, args, kwargs)
        outputs = [] if out is None else _tensors(out)  # None: an in-place op with no result (its effect replays)
        if outputs is None:
            raise CaptureError(f"inside a CUDA graph capture: {func} returned {type(out).__name__}, a host value")
        for t in outputs:
            if not any(t is a for a in inputs):
                self.emulator.allocated(t)
        self.emulator.reads(func, args, kwargs.values())
        self.graph.kernels.append(("torch", func, args, kwargs, outputs))
        return out


class EmulatedCudaGraphs:
    """Patches torch.cuda's graph and stream API (and `runner`'s capture stream) so that ModelRunner captures
    RecordingGraphs on CPU. `graphs`: every graph captured, in order."""

    def __init__(self, runner):
        self.runner = runner
        self.graphs: list[RecordingGraph] = []
        self.capturing: RecordingGraph | None = None
        self.inside_triton: list = []  # the Triton launches running now
        self.owner: dict[int, RecordingGraph] = {}  # storage -> the graph whose capture allocated it
        self.shared: dict[int, tuple[str, set]] = {}  # storage one capture allocated -> (what, other graphs reading it)
        self._reads: dict[int, str] = {}  # the current capture's reads of them, kept if it succeeds
        self._pool: list[torch.Tensor] = []
        self._stack = contextlib.ExitStack()

    def allocated(self, t: torch.Tensor) -> None:
        """`t` was allocated inside the current capture (in the graphs' pool). Kept alive, as the pool keeps its
        memory: no later tensor gets its address."""
        if _storage(t) is not None:
            self.owner.setdefault(_storage(t), self.capturing)
            self._pool.append(t)

    def reads(self, what, *arg_lists) -> None:
        """A kernel of the current capture takes these arguments: note those another capture allocated."""
        for t in _flat_tensors([a for args in arg_lists for a in args]):
            owner = self.owner.get(_storage(t))
            if owner is not None and owner is not self.capturing:
                self._reads.setdefault(_storage(t), f"{list(t.shape)} {t.dtype} read by {what}")

    def unheld_outputs(self) -> list[str]:
        """Each tensor one capture allocated and a graph the runner still holds reads, which the runner itself no
        longer references (its attributes, and their dicts, lists, tuples and qwen2rt objects)."""
        held, graphs, seen = set(), set(), set()

        def visit(value, depth):
            if isinstance(value, torch.Tensor):
                held.add(_storage(value))
            elif isinstance(value, RecordingGraph):
                graphs.add(value)
            elif depth > 4 or id(value) in seen:
                return
            elif isinstance(value, (list, tuple, dict)):
                seen.add(id(value))
                for v in value.values() if isinstance(value, dict) else value:
                    visit(v, depth + 1)
            elif type(value).__module__.startswith("qwen2rt") and not isinstance(value, torch.nn.Module) \
                    and hasattr(value, "__dict__"):
                seen.add(id(value))
                visit(vars(value), depth + 1)

        visit(vars(self.runner), 0)
        return [what for storage, (what, readers) in self.shared.items() if readers & graphs and storage not in held]

    @contextlib.contextmanager
    def _graph(self, graph: RecordingGraph, pool=None, stream=None, capture_error_mode="global"):
        assert isinstance(graph, RecordingGraph) and not graph.captured and self.capturing is None
        if capture_error_mode != "thread_local":  # another thread's CUDA work would invalidate a lazy capture
            raise CaptureError(f"captured in capture_error_mode={capture_error_mode!r}, not 'thread_local'")
        self.capturing, self._reads = graph, {}
        try:
            with _Recorder(self, graph):
                yield graph
        finally:
            self.capturing = None
        graph.captured = True
        self.graphs.append(graph)
        for storage, what in self._reads.items():  # a failed capture's reads do not count: its graph is not kept
            self.shared.setdefault(storage, (what, set()))[1].add(graph)

    def _host_read(self, name, original):
        emulator = self

        def read(tensor, *args, **kwargs):
            if emulator.capturing is not None and not emulator.inside_triton:
                raise CaptureError(f"inside a CUDA graph capture: Tensor.{name}() reads device data on the host")
            return original(tensor, *args, **kwargs)
        return read

    def host_access(self, *arg_lists) -> str | None:
        """What a kernel's tensor arguments touch of the runner's host memory, or None."""
        for t in _flat_tensors([a for args in arg_lists for a in args]):
            start = t.data_ptr()
            for lo, hi, name in self._host:
                if lo <= start < hi:
                    return f"a tensor argument lies in the runner's host memory ({name})"
        return None

    def _synchronize(self, *_):
        if self.capturing is not None:
            raise CaptureError("inside a CUDA graph capture: torch.cuda.synchronize()")

    def _launched(self, run, fn, args, kwargs) -> bool:
        """A Triton launch: inside a capture recorded, not run."""
        graph = self.capturing
        if graph is None:
            return True
        problem = self.host_access(args, kwargs.values())
        if problem:
            raise CaptureError(f"inside a CUDA graph capture: Triton kernel {fn.fn.__name__} -- {problem}")
        self.reads(f"Triton kernel {fn.fn.__name__}", args, kwargs.values())
        graph.kernels.append(("triton", run, fn, args, kwargs))
        return False

    def __enter__(self):
        class Stream:
            def wait_stream(self, other):
                pass

        self.inside_triton = self._stack.enter_context(interpreter_launches(self._launched))
        patch = self._stack.enter_context(pytest.MonkeyPatch.context())
        patch.setattr(torch.cuda, "CUDAGraph", RecordingGraph)
        patch.setattr(torch.cuda, "graph", self._graph)
        patch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        patch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
        patch.setattr(torch.cuda, "synchronize", self._synchronize)
        patch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
        patch.setattr(self.runner, "_capture_stream", Stream)
        for name in ("tolist", "numpy", "item"):
            patch.setattr(torch.Tensor, name, self._host_read(name, getattr(torch.Tensor, name)))
        self._host = host_ranges(self.runner)
        self._use_graphs, self.runner.use_graphs = self.runner.use_graphs, True
        return self

    def __exit__(self, exc_type, *exc):
        self.runner.use_graphs = self._use_graphs
        self._stack.close()
        unheld = self.unheld_outputs() if exc_type is None else []
        if unheld:
            raise CaptureError("a graph reads memory another capture allocated that the runner no longer references "
                               "(on a GPU the pool may give it to a later capture): " + "; ".join(unheld))
