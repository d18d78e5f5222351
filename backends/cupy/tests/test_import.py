"""The plugin imports, registers and stays light on a machine without CuPy."""

from __future__ import annotations

import subprocess
import sys

import moerouter_cupy

from moerouter import BackendInfo


def test_backend_declares_kernels():
    assert isinstance(moerouter_cupy.backend, BackendInfo)
    assert moerouter_cupy.backend.array_library == "cupy"
    assert set(moerouter_cupy.backend.kernels) == {"make_plan", "dispatch", "combine"}


def test_import_does_not_import_cupy():
    # CuPy is imported inside the kernels, on first use.
    code = "import sys, moerouter_cupy; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
