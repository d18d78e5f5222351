"""Backend plugins: declared once, found lazily, chosen per call from the array's type.

A plugin is a module exposing ``backend: BackendInfo``. The core knows the built-in plugins by name
(:data:`BUILTIN_PLUGINS`) and finds third-party ones through the ``moerouter.backends`` entry point
group, scanned only when an array of an unknown library arrives. The array's library is read from
its type's module (``torch.Tensor`` -> ``"torch"``), never by importing anything.

``MOEROUTER_BACKEND=reference`` forces the agnostic path everywhere; ``MOEROUTER_BACKEND=<name>``
asks for one plugin by name, and then a plugin that fails to load raises instead of falling back.

Device kernels come in :class:`KernelSet` s, each declaring once whether its GPU tests have passed
on real hardware. A set that has not is off (its arrays take the plugin's other path, or the
agnostic one) unless ``MOEROUTER_UNVERIFIED_KERNELS`` names it (or says ``all``): a silently wrong
default is worse than a slower one. ``tools/gpu-check`` sets it to prove them.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import array_api_compat

__all__ = [
    "KERNEL_NAMES",
    "UNVERIFIED_KERNELS_VARIABLE",
    "BackendInfo",
    "KernelSet",
    "array_library",
    "kernel_for",
    "kernel_set_enabled",
    "known_plugins",
    "register",
    "reset",
]

ENTRY_POINT_GROUP = "moerouter.backends"

#: The kernels a plugin may provide; anything it leaves out runs on the agnostic path.
#: ``make_plan``, ``dispatch`` and ``combine`` take the public functions' arguments. ``top_k`` is
#: ``top_k(scores, k, *, nan_free) -> columns``: the k best columns of each row (ties to the lower
#: column, best first, ``-inf`` after every finite value, NaN last), the agnostic
#: :func:`moerouter._agnostic.select.top_k`. ``router`` is the token-choice router of
#: :func:`moerouter.policies._router.run_router` (its ``kernel`` signature).
KERNEL_NAMES = frozenset({"make_plan", "dispatch", "combine", "top_k", "router"})

#: Array library -> plugin module, for the plugins that ship with moerouter.
#: NumPy's fast kernels ship inside the core; the others are separate distributions.
BUILTIN_PLUGINS: Mapping[str, str] = {
    "numpy": "moerouter._numpy_backend",
    "torch": "moerouter_torch",
    "jax": "moerouter_jax",
    "cupy": "moerouter_cupy",
}

# Libraries with no kernels of their own: never look for a plugin for them.
_AGNOSTIC_ONLY = frozenset({"array_api_strict"})

#: Comma-separated names of unverified kernel sets to switch on anyway, or ``all``.
UNVERIFIED_KERNELS_VARIABLE = "MOEROUTER_UNVERIFIED_KERNELS"


@dataclass(frozen=True)
class KernelSet:
    """A group of device kernels that is switched on as one, and whether it has run on hardware.

    Kernels that have only run in an interpreter or a compiler are off by default: the arrays they
    serve take a proven path instead. ``verified_on`` is the one place that records a passing
    run of the set's ``gpu``-marked tests (``tools/gpu-check`` writes the line to copy here); the
    variable ``MOEROUTER_UNVERIFIED_KERNELS`` switches unverified sets on by name.

    Parameters
    ----------
    name : str
        Short name used by ``MOEROUTER_UNVERIFIED_KERNELS`` (``"torch-triton"``): letters,
        digits, ``-`` and ``_``.
    description : str
        One line for ``python -m moerouter info``.
    verified_on : str
        Where and with what the set's GPU tests passed (device, library versions, date), or
        ``""`` while they never have.
    replaces : frozenset of str
        Names in :attr:`BackendInfo.kernels` that *are* this set: while it is off the registry
        runs the agnostic path for them. Empty when the plugin itself chooses another path (a
        set used inside a plugin's kernel).
    """

    name: str
    description: str = ""
    verified_on: str = ""
    replaces: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "_").isidentifier():
            raise ValueError(
                f"KernelSet.name must be letters, digits, '-' and '_', got {self.name!r}"
            )
        object.__setattr__(self, "replaces", frozenset(self.replaces))
        unknown = set(self.replaces) - KERNEL_NAMES
        if unknown:
            raise ValueError(
                f"KernelSet.replaces has unknown kernel names {sorted(unknown)}; "
                f"known: {sorted(KERNEL_NAMES)}"
            )

    @property
    def verified(self) -> bool:
        """True once the set's GPU tests have passed on real hardware."""
        return bool(self.verified_on)


def _requested_unverified() -> frozenset[str]:
    value = os.environ.get(UNVERIFIED_KERNELS_VARIABLE, "")
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def kernel_set_enabled(kernel_set: KernelSet) -> bool:
    """Whether ``kernel_set`` may run: verified on hardware, or asked for by name (or ``all``).

    Read on every call, so setting ``MOEROUTER_UNVERIFIED_KERNELS`` takes effect at once (a
    function already traced by ``jax.jit`` keeps the path it was traced with).
    """
    if kernel_set.verified:
        return True
    requested = _requested_unverified()
    return "all" in requested or kernel_set.name in requested


@dataclass(frozen=True)
class BackendInfo:
    """What a backend plugin declares about itself.

    Parameters
    ----------
    name : str
        Short name, used by ``MOEROUTER_BACKEND=<name>`` (``"torch"``).
    array_library : str
        Top-level module of the array type the plugin serves (``"torch"``, ``"jax"``, ``"cupy"``).
    kernels : Mapping[str, Callable]
        Fast implementations by name, a subset of :data:`KERNEL_NAMES`. Each takes the same
        arguments as the public function of that name. Empty means: agnostic path only.
    description : str
        One line for ``python -m moerouter info``.
    kernel_sets : tuple of KernelSet
        The plugin's device kernel sets, each with its verification record (see
        :class:`KernelSet`); ``python -m moerouter info`` lists them.
    """

    name: str
    array_library: str
    kernels: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    description: str = ""
    kernel_sets: tuple[KernelSet, ...] = ()
    # kernel name -> the set it belongs to, filled from kernel_sets (a plain dict, as kernels).
    _gates: dict[str, KernelSet] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"BackendInfo.name must be an identifier, got {self.name!r}")
        if not self.array_library.isidentifier():
            raise ValueError(
                f"BackendInfo.array_library must be a module name, got {self.array_library!r}"
            )
        unknown = set(self.kernels) - KERNEL_NAMES
        if unknown:
            raise ValueError(
                f"BackendInfo.kernels has unknown kernel names {sorted(unknown)}; "
                f"known: {sorted(KERNEL_NAMES)}"
            )
        for kernel_name, kernel in self.kernels.items():
            if not callable(kernel):
                raise TypeError(f"BackendInfo.kernels[{kernel_name!r}] is not callable")
        # A private copy; a plain dict, because torch.compile refuses to read a mappingproxy in a
        # function that also fills the registry's cache.
        object.__setattr__(self, "kernels", dict(self.kernels))
        object.__setattr__(self, "kernel_sets", tuple(self.kernel_sets))
        gates: dict[str, KernelSet] = {}
        for kernel_set in self.kernel_sets:
            if not isinstance(kernel_set, KernelSet):
                raise TypeError(
                    f"BackendInfo.kernel_sets must hold KernelSet, got {type(kernel_set).__name__}"
                )
            for kernel_name in kernel_set.replaces:
                if kernel_name not in self.kernels:
                    raise ValueError(
                        f"KernelSet {kernel_set.name!r} replaces {kernel_name!r}, "
                        "which BackendInfo.kernels does not provide"
                    )
                gates[kernel_name] = kernel_set
        object.__setattr__(self, "_gates", gates)


# array library -> loaded BackendInfo, or None once we know there is none (or it failed to load).
_loaded: dict[str, BackendInfo | None] = {}


# array-api-compat's checks look at sys.modules only: they never import a framework.
_LIBRARY_CHECKS: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("numpy", array_api_compat.is_numpy_array),
    ("torch", array_api_compat.is_torch_array),
    ("jax", array_api_compat.is_jax_array),  # concrete arrays live in jaxlib, tracers in jax
    ("cupy", array_api_compat.is_cupy_array),
)


def array_library(array: object) -> str:
    """Name of the library an array belongs to: ``"numpy"``, ``"torch"``, ``"jax"``, ...

    Unknown types are named by the top-level module of their class.
    """
    for library, check in _LIBRARY_CHECKS:
        if check(array):
            return library
    return type(array).__module__.partition(".")[0]


def _entry_point_plugins() -> dict[str, str]:
    """Entry point name -> ``module:attribute`` for every installed third-party plugin."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_plugins() -> dict[str, str]:
    """Every plugin moerouter could load: name -> ``module[:attribute]`` (built-ins first)."""
    return {**BUILTIN_PLUGINS, **_entry_point_plugins()}


def _import_plugin(target: str) -> BackendInfo:
    module_name, _, attribute = target.partition(":")
    # An imported plugin is read from sys.modules: torch.compile cannot trace import_module.
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    info = getattr(module, attribute or "backend")
    if not isinstance(info, BackendInfo):
        raise TypeError(f"plugin {target!r} does not expose a moerouter.BackendInfo")
    return info


def _find(library: str) -> BackendInfo | None:
    requested = os.environ.get("MOEROUTER_BACKEND", "")
    candidates = []
    if library in BUILTIN_PLUGINS:
        candidates.append(BUILTIN_PLUGINS[library])
    else:  # only now pay for the entry point scan
        candidates.extend(_entry_point_plugins().values())
    for target in candidates:
        try:
            info = _import_plugin(target)
        except ImportError as error:
            if requested and requested == library:
                raise ImportError(
                    f"MOEROUTER_BACKEND={requested!r} asks for plugin {target!r}, "
                    f"which failed to load: {error}"
                ) from error
            if library in BUILTIN_PLUGINS and getattr(error, "name", None) == target:
                return None  # the plugin is simply not installed: the agnostic path is the answer
            warnings.warn(
                f"moerouter plugin {target!r} failed to load ({error}); "
                f"{library} arrays use the agnostic path",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        if info.array_library == library:
            return info
    return None


def register(info: BackendInfo) -> BackendInfo:
    """Make ``info`` the plugin for its array library now, instead of at its first array.

    Built-in plugins call this when imported, so that after ``import moerouter_torch`` a function
    traced by ``torch.compile`` never reaches the lazy import (which cannot be traced).
    """
    if not isinstance(info, BackendInfo):
        raise TypeError(f"info must be a moerouter.BackendInfo, got {type(info).__name__}")
    _loaded[info.array_library] = info
    return info


def reset() -> None:
    """Forget every loaded plugin: the next array of each library looks its plugin up again.

    The registry caches one answer per array library (the plugin, or None for the agnostic path),
    so a change of ``MOEROUTER_BACKEND`` after a plugin was looked up needs this to be seen.
    :func:`moerouter.testing.use_backend` calls it on entry and exit.
    """
    _loaded.clear()


def backend_for(array: object) -> BackendInfo | None:
    """The plugin serving ``array``, or None when the agnostic path should run."""
    if os.environ.get("MOEROUTER_BACKEND") == "reference":
        return None
    library = array_library(array)
    if library in _AGNOSTIC_ONLY:
        return None
    if library not in _loaded:
        _loaded[library] = _find(library)
    return _loaded[library]


def kernel_for(name: str, array: object) -> Callable[..., Any] | None:
    """The fast kernel ``name`` for ``array``'s library, or None for the agnostic path.

    A kernel belonging to a :class:`KernelSet` that is off (not verified, not asked for) is None.
    """
    info = backend_for(array)
    if info is None:
        return None
    kernel_set = info._gates.get(name)
    if kernel_set is not None and not kernel_set_enabled(kernel_set):
        return None
    return info.kernels.get(name)
