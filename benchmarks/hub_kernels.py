"""The repository's top-level kernels/ directory (installed as qwen2rt.kernels) has the import name of Hugging Face's
`kernels` distribution, which transformers >= 5.25 depends on and imports (`from kernels import CUDAProperties`) once
it is installed. Whenever the repository root is on sys.path (`python -m` from the root, pytest's `pythonpath`), that
import finds our directory and `import transformers...` fails. `import_hub_kernels()` imports the installed
distribution first, under its own name, so that `kernels` is it for the rest of the process. Called by
benchmarks/__init__.py and tests/conftest.py, before anything imports transformers."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _in_root(path: str) -> bool:
    try:
        return Path(path or ".").resolve() == ROOT
    except OSError:
        return False


def _ours(module) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and Path(file).resolve().is_relative_to(ROOT / "kernels")


def import_hub_kernels() -> None:
    """Make `kernels` the installed distribution, if there is one (else leave it unimported). Any other error in
    importing the distribution is raised: transformers would fail on it anyway."""
    module = sys.modules.get("kernels")
    if module is not None:
        if not _ours(module):
            return  # already the distribution
        for name in [n for n in sys.modules if n == "kernels" or n.startswith("kernels.")]:
            if _ours(sys.modules[name]):
                del sys.modules[name]  # our directory and its modules, imported under the wrong name
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if not _in_root(p)]
    try:
        importlib.import_module("kernels")
    except ModuleNotFoundError as e:
        if e.name != "kernels":
            raise
    finally:
        sys.path[:] = saved
