"""``python -m moerouter demo | bench | simulate | info``.

- ``demo``: pretrains a tiny top-2 MoE language model on the standard library's sources, then
  fine-tunes it as top-2, top-1 and AdaMoE (converted), and writes a table with standard errors,
  a JSON and a plot of loss against expert FLOPs. A torch program, it lives in the torch plugin
  (``moerouter_torch.demo``) and is imported only when asked for.
- ``bench``: dispatch/combine/router timings against the same-run copy roof.
- ``simulate``: expert-parallel traffic, loads and all-to-all time of a workload or a trace on
  a simulated cluster (``moerouter/simulate/_command.py``).
- ``info``: backends found, versions, devices, and whether each GPU kernel set is on.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

import moerouter as mr
from moerouter import _registry
from moerouter.simulate import _command as _simulate

__all__ = ["main"]

_LIBRARIES = ("numpy", "array_api_compat", "array_api_strict", "torch", "jax", "cupy", "triton")


def _version(name: str) -> str:
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        return str(getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as error:  # an installed but broken library is worth reporting, not dying on
        return f"fails to import ({type(error).__name__}: {error})"


def _devices(library: str) -> str:
    try:
        if library == "torch":
            import torch

            gpus = torch.cuda.device_count()
            return "cpu" + (f", {gpus} cuda ({torch.cuda.get_device_name(0)})" if gpus else "")
        if library == "jax":
            import jax

            return ", ".join(sorted({str(d.platform) for d in jax.devices()}))
        if library == "cupy":
            import cupy

            return f"{cupy.cuda.runtime.getDeviceCount()} cuda"
    except Exception as error:
        return f"unavailable ({type(error).__name__})"
    return "cpu"


def info(_: argparse.Namespace) -> int:
    """Print versions, the plugins moerouter can load, and the devices each library sees."""
    print(f"moerouter {mr.__version__}  (python {sys.version.split()[0]})\n")
    print("libraries:")
    for name in _LIBRARIES:
        print(f"  {name:<18} {_version(name)}")
    print("\nbackend plugins:")
    for library, target in _registry.known_plugins().items():
        module = target.partition(":")[0]
        if importlib.util.find_spec(module.partition(".")[0]) is None:
            print(f"  {library:<8} {target:<32} not installed")
            continue
        try:
            plugin = _registry._import_plugin(target)
        except Exception as error:
            print(f"  {library:<8} {target:<32} fails to load: {error}")
            continue
        kernels = ", ".join(sorted(plugin.kernels)) or "none (agnostic path)"
        devices = _devices(library) if importlib.util.find_spec(library) else "library missing"
        print(f"  {library:<8} {target:<32} kernels: {kernels}; devices: {devices}")
        for kernel_set in plugin.kernel_sets:
            print(f"  {'':<8} kernel set {kernel_set.name}: {_kernel_set_status(kernel_set)}")
    return 0


def _kernel_set_status(kernel_set: _registry.KernelSet) -> str:
    if kernel_set.verified:
        return f"on (passed on {kernel_set.verified_on})"
    variable = _registry.UNVERIFIED_KERNELS_VARIABLE
    if _registry.kernel_set_enabled(kernel_set):
        return f"on, unverified (asked for by {variable}; has not passed on a GPU yet)"
    return f"off (has not passed on a GPU yet; {variable}={kernel_set.name} switches it on)"


DEMO_MODULE = "moerouter_torch.demo"
DEMO_HELP = "pretrain a tiny top-2 MoE language model, fine-tune it per routing policy, compare"


def _import_demo() -> ModuleType | str:
    """The torch plugin's demo module, or why it cannot be imported (what to install)."""
    hints = (
        ("torch", "pip install torch"),
        ("moerouter_torch", "pip install -e backends/torch"),
        (DEMO_MODULE, "pip install -e backends/torch"),
    )
    for module, hint in hints:
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            return (
                f"the demo needs {module}, which failed to import ({error}); {hint} "
                "(or run it with `nox -s demo`)"
            )
    return imported


def demo(args: argparse.Namespace, parser: argparse.ArgumentParser, module: ModuleType) -> int:
    """Check the input (exit 2 naming the option), then train and report."""
    try:
        device = module.check(args)
    except module.DemoInputError as error:
        parser.error(str(error))
    status: int = module.run(args, device)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options: hand them over untouched
        from moerouter._bench import main as bench_main

        result: int = bench_main(argv[1:])
        return result
    description = "moerouter: demo, benchmarks, simulator and environment report"
    parser = argparse.ArgumentParser(prog="python -m moerouter", description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    # The demo's options live in the torch plugin: imported only when the demo is asked for.
    demo_module = _import_demo() if argv[:1] == ["demo"] else None
    demo_description = None
    if isinstance(demo_module, ModuleType) and demo_module.__doc__:
        demo_description = demo_module.__doc__.split("\n\n")[1]
    demo_parser = commands.add_parser("demo", help=DEMO_HELP, description=demo_description)
    if isinstance(demo_module, ModuleType):
        demo_module.add_arguments(demo_parser)
    elif isinstance(demo_module, str):  # say what to install, whatever the options were
        demo_parser.error(demo_module)
    commands.add_parser("bench", help="kernel timings against the copy roof (bench --help)")
    simulate_parser = commands.add_parser(
        "simulate",
        help="expert-parallel traffic, loads and all-to-all time on a simulated cluster",
        description=_simulate.__doc__.split("\n\n")[1] if _simulate.__doc__ else None,
    )
    _simulate.add_arguments(simulate_parser)
    commands.add_parser("info", help="backends, versions, devices").set_defaults(run=info)
    args = parser.parse_args(argv)
    if args.command == "demo":
        args.argv = argv  # recorded in results.json
        assert isinstance(demo_module, ModuleType)  # imported above when the command is demo
        return demo(args, demo_parser, demo_module)
    if args.command == "simulate":
        args.argv = argv
        return _simulate.main(args, simulate_parser)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
