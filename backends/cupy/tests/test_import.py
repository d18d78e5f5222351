"""The plugin imports, registers and stays light on a machine without CuPy."""

from __future__ import annotations

import importlib
import subprocess
import sys

import moerouter_cupy

from moerouter import BackendInfo


def test_backend_declares_kernels(monkeypatch):
    # Unvalidated kernels are opt-in: none by default, all three with MOEROUTER_CUPY_KERNELS=1.
    assert isinstance(moerouter_cupy.backend, BackendInfo)
    assert moerouter_cupy.backend.array_library == "cupy"
    monkeypatch.delenv("MOEROUTER_CUPY_KERNELS", raising=False)
    assert dict(importlib.reload(moerouter_cupy).backend.kernels) == {}
    monkeypatch.setenv("MOEROUTER_CUPY_KERNELS", "1")
    kernels = importlib.reload(moerouter_cupy).backend.kernels
    assert set(kernels) == {"make_plan", "dispatch", "combine"}
    monkeypatch.delenv("MOEROUTER_CUPY_KERNELS")
    importlib.reload(moerouter_cupy)


def test_import_does_not_import_cupy():
    # CuPy is imported inside the kernels, on first use.
    code = "import sys, moerouter_cupy; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
