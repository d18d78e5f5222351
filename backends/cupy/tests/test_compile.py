"""Every CUDA source compiles with nvcc for sm_80 and sm_90, without a single warning.

No GPU is needed: this is how CI (and a machine without a GPU) checks the kernels. The compiles
run concurrently, once per session; each (file, architecture) pair is its own test case.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from moerouter_cupy import _kernels

KERNEL_DIR = _kernels.KERNEL_DIR
SOURCES = sorted(path.name for path in KERNEL_DIR.glob("*.cu"))
ARCHITECTURES = ["sm_80", "sm_90"]  # A100 and H100: bfloat16 and cp.async era GPUs

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")


def nvcc_command(source: str, architecture: str, output: Path) -> list[str]:
    return [
        "nvcc",
        "-cubin",  # device code only: no host compiler pass, a few seconds per file
        f"-arch={architecture}",
        "--std=c++17",
        "-Werror",
        "all-warnings",
        f"-I{KERNEL_DIR}",
        *_kernels.NO_IMPLICIT_CONVERSIONS,  # as cupy.RawModule compiles them
        "-o",
        str(output),
        str(KERNEL_DIR / source),
    ]


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[int, str]]:
    """(source, architecture) -> (return code, compiler output), all compiled concurrently."""
    directory = tmp_path_factory.mktemp("cubin")
    running = {
        (source, architecture): subprocess.Popen(
            nvcc_command(source, architecture, directory / f"{source}.{architecture}.cubin"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for source in SOURCES
        for architecture in ARCHITECTURES
    }
    results = {}
    for key, process in running.items():
        output, _ = process.communicate(timeout=300)
        results[key] = (process.returncode, output)
    return results


def test_every_kernel_file_is_compiled():
    # The loader and this test must agree on the sources.
    assert sorted(f"{name}.cu" for name in _kernels.NAME_EXPRESSIONS) == SOURCES


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES)
def test_compiles_without_warnings(compiled, source, architecture):
    returncode, output = compiled[(source, architecture)]
    assert returncode == 0, output
    assert "warning" not in output.lower(), output


@pytest.mark.parametrize("module", sorted(_kernels.NAME_EXPRESSIONS))
def test_name_expressions_are_instantiated(module):
    # Each NVRTC name expression names a kernel the file defines; templates are instantiated
    # explicitly in the file, so nvcc compiles (and warns about) every variant CuPy loads.
    source = (KERNEL_DIR / f"{module}.cu").read_text()
    for expression in _kernels.NAME_EXPRESSIONS[module]:
        name = expression.removeprefix("moerouter::").partition("<")[0]
        assert re.search(rf"__global__ void {name}\b", source), expression
        if "<" in expression:
            arguments = expression.partition("<")[2].rstrip(">")
            first = arguments.split(",")[0].strip()
            assert first in source, expression
