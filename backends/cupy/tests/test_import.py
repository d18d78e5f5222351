"""The plugin imports, registers and stays light on a machine without CuPy."""

from __future__ import annotations

import subprocess
import sys

import moerouter_cupy

from moerouter import BackendInfo, _registry


def test_backend_declares_kernels_behind_an_unverified_set(monkeypatch):
    # All four kernels (the fused router too) are declared, and all belong to the cupy-cuda
    # kernel set, which stays off (the agnostic path) until it has passed on a GPU or is asked
    # for by name.
    backend = moerouter_cupy.backend
    assert isinstance(backend, BackendInfo)
    assert backend.array_library == "cupy"
    assert set(backend.kernels) == {"make_plan", "dispatch", "combine", "router"}
    assert backend.kernel_sets == (moerouter_cupy.KERNELS,)
    assert moerouter_cupy.KERNELS.replaces == {"make_plan", "dispatch", "combine", "router"}
    assert not moerouter_cupy.KERNELS.verified
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    assert not _registry.kernel_set_enabled(moerouter_cupy.KERNELS)
    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "cupy-cuda")
    assert _registry.kernel_set_enabled(moerouter_cupy.KERNELS)


def test_import_does_not_import_cupy():
    # CuPy is imported inside the kernels, on first use.
    code = "import sys, moerouter_cupy; assert 'cupy' not in sys.modules, 'cupy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
