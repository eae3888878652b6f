"""Every Triton kernel compiles for an H100 (sm_90) on this CPU machine: ahead-of-time compilation through
Triton's bundled ptxas, in a subprocess (the kernels must be imported without the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton's ptxas ships for Linux")
def test_all_kernels_compile_for_sm90():
    r = subprocess.run([sys.executable, os.path.join(HERE, "aot_sm90.py"), "--quick"], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "compiled" in r.stdout and "FAILED" not in r.stdout
