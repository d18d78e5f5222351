"""Every developer task, and the test matrix: ``nox -s <session>``.

The README's two commands are ``nox -s demo`` and ``nox -s lint tests_core tests docs``.
torch is pinned: an unpinned torch pulls a multi-GB CUDA build.
"""

import nox

nox.options.sessions = ["lint", "tests_core", "tests", "docs"]
nox.options.error_on_missing_interpreters = True

TORCH = "torch==2.13.0"
JAX = "jax[cpu]>=0.4.35"
FLAX = "flax==0.12.8"  # pinned: a newer flax may pull a newer jax
TRITON = "triton==3.9.0"
TRANSFORMERS = "transformers==5.23.0"  # moerouter_torch.integrations.transformers
# The GPU session (CUDA 13): the JAX the CPU suite runs, with its CUDA plugin; the CuPy of the
# H200 image tools/gpu-check was written for.
JAX_CUDA = "jax[cuda13]==0.10.2"
CUPY_CUDA = "cupy-cuda13x==14.2.0"
PLUGINS = ["-e", "backends/torch", "-e", "backends/jax", "-e", "backends/cupy"]
PYTEST = ["pytest", "-p", "no:cacheprovider"]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format) and mypy --strict on the core."""
    session.install("ruff>=0.6", "mypy>=1.10", "-e", ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def tests_core(session: nox.Session) -> None:
    """The core with NumPy and array-api-strict only: proves it needs no framework."""
    session.install("-e", ".[test]")
    session.run(*PYTEST, "tests", "-m", "not gpu", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Every CPU backend: the equivalence matrix, plugin tests, jit and compile."""
    # scipy: the CSR combine path; transformers: the transformers integration tests;
    # flax: the JAX plugin's optional NNX module
    session.install(TORCH, JAX, FLAX, "scipy", TRANSFORMERS, "-e", ".[test,demo]", *PLUGINS)
    session.install("--no-deps", TRITON)  # the Triton kernels run in its CPU interpreter
    session.run(*PYTEST, "tests", "backends", "-m", "not gpu", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    """The gpu-marked tests on a CUDA 13 GPU, every unverified kernel set switched on.

    The same test files as ``tools/gpu-check`` runs (it uses the machine's own Python instead of a
    virtual environment, and adds the benchmarks); CuPy is installed, so its tests run too.
    """
    session.install(TORCH, JAX_CUDA, CUPY_CUDA, "-e", ".[test]", *PLUGINS)
    listed = session.run("python", "tools/gpu-check", "--list-tests", silent=True)
    session.run(
        *PYTEST,
        "-m",
        "gpu",
        *str(listed).split(),
        *session.posargs,
        env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "MOEROUTER_UNVERIFIED_KERNELS": "all"},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Sphinx with the gallery run, warnings as errors; then check the site works offline."""
    # The gallery's framework examples and the generated kernel table need every plugin, jax and
    # transformers; [demo]: matplotlib for the gallery's figures.
    session.install(
        "-r", "docs/requirements.txt", TORCH, JAX, TRANSFORMERS, "-e", ".[demo]", *PLUGINS
    )
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run("python", "docs/check_html.py", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """Quick benchmark table against the same-run copy roof (asv for history: asv_bench/)."""
    session.install(TORCH, "-e", ".", "-e", "backends/torch")
    session.run("python", "-m", "moerouter", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: ``python -m moerouter demo`` (pretrain a tiny MoE, fine-tune it 4 ways)."""
    session.install(TORCH, "-e", ".[demo]", "-e", "backends/torch")  # [demo]: matplotlib
    session.run("python", "-m", "moerouter", "demo", *session.posargs)
