"""benchmarks/hub_kernels.py: `kernels` is Hugging Face's distribution (a dependency of transformers >= 5.25), never
our kernels/ directory, even with the repository root first on sys.path."""

from __future__ import annotations

import importlib.metadata
import sys
import types

from benchmarks.hub_kernels import ROOT, import_hub_kernels


def test_kernels_is_the_installed_distribution_not_our_directory(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    ours = types.ModuleType("kernels")
    ours.__file__ = str(ROOT / "kernels" / "__init__.py")  # our directory, imported under the top-level name
    ours_moe = types.ModuleType("kernels.moe")  # ... with its modules
    ours_moe.__file__ = str(ROOT / "kernels" / "moe.py")
    monkeypatch.setitem(sys.modules, "kernels", ours)
    monkeypatch.setitem(sys.modules, "kernels.moe", ours_moe)
    import_hub_kernels()
    assert sys.modules.get("kernels.moe") is not ours_moe
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed (transformers < 5.25): left unimported
        assert "kernels" not in sys.modules
        return
    module = sys.modules["kernels"]
    assert module is not ours and not module.__file__.startswith(str(ROOT / "kernels"))
    assert hasattr(module, "CUDAProperties")  # what transformers imports from it
