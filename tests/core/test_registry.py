"""Backend registry: declared plugins, lazy discovery; requests raise, auto-selection falls back."""

from __future__ import annotations

import os
import sys
import types
import warnings
from types import MappingProxyType

import numpy as np
import pytest

import moerouter as mr
from moerouter import _registry


class FakeArray:
    """An array type of a library moerouter has never heard of."""


FakeArray.__module__ = "fakelib.core"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    # Every test starts with nothing loaded and no MOEROUTER_BACKEND, and leaves no trace.
    monkeypatch.setattr(_registry, "_loaded", {})
    monkeypatch.delenv("MOEROUTER_BACKEND", raising=False)


def noop(*args):
    return args


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        # MOEROUTER_BACKEND=<name> must be able to name it.
        pytest.param({"name": "my plugin"}, ValueError, "name must be an identifier"),
        # The array library is a top-level module name.
        pytest.param({"array_library": "torch.Tensor"}, ValueError, "must be a module name"),
        # A misspelt kernel would silently never run.
        pytest.param({"kernels": {"dispath": noop}}, ValueError, "unknown kernel names"),
        # A kernel must be callable.
        pytest.param({"kernels": {"combine": 3}}, TypeError, "is not callable"),
    ],
)
def test_backend_info_validation(options, error, match):
    fields = {"name": "fake", "array_library": "fakelib", **options}
    with pytest.raises(error, match=match):
        mr.BackendInfo(**fields)


def test_backend_info_is_frozen():
    # Frozen, and its kernel table is a private copy: the caller's dict cannot change it later.
    # (A plain dict, not a mappingproxy: torch.compile cannot read a mappingproxy in a traced
    # function that also fills the registry's cache.)
    kernels = {"dispatch": noop}
    info = mr.BackendInfo(name="fake", array_library="fakelib", kernels=kernels)
    kernels["combine"] = noop
    assert set(info.kernels) == {"dispatch"}
    with pytest.raises(AttributeError):
        info.name = "other"


def test_array_library_is_read_from_the_type():
    assert _registry.array_library(np.zeros(1)) == "numpy"
    assert _registry.array_library(FakeArray()) == "fakelib"


def spy_plugin(monkeypatch, calls):
    def dispatch(x, plan):
        calls.append("dispatch")
        return np.zeros((plan.num_rows, x.shape[1]), x.dtype)

    info = mr.BackendInfo(name="numpy", array_library="numpy", kernels={"dispatch": dispatch})
    monkeypatch.setitem(_registry._loaded, "numpy", info)


def test_plugin_kernel_is_used(monkeypatch):
    # A loaded plugin's kernel runs instead of the agnostic path.
    calls = []
    spy_plugin(monkeypatch, calls)
    plan = mr.make_plan(mr.TopK(num_experts=2, k=1)(np.eye(2, dtype=np.float32)))
    mr.dispatch(np.ones((2, 3), np.float32), plan)
    assert calls == ["dispatch"]


def test_reference_forces_the_agnostic_path(monkeypatch):
    # MOEROUTER_BACKEND=reference: no plugin kernel runs, even one already loaded.
    calls = []
    spy_plugin(monkeypatch, calls)
    monkeypatch.setenv("MOEROUTER_BACKEND", "reference")
    plan = mr.make_plan(mr.TopK(num_experts=2, k=1)(np.eye(2, dtype=np.float32)))
    xe = mr.dispatch(np.ones((2, 3), np.float32), plan)
    assert calls == []
    assert np.all(xe == 1)
    assert _registry.kernel_for("combine", np.zeros(1)) is None


def broken_import(target):
    # A plugin that is installed but whose own dependency is missing.
    raise ImportError(f"{target} needs libfake", name="libfake")


def use_fake_builtin(monkeypatch):
    plugins = {**_registry.BUILTIN_PLUGINS, "fakelib": "moerouter_fakelib"}
    monkeypatch.setattr(_registry, "BUILTIN_PLUGINS", MappingProxyType(plugins))


def test_requested_plugin_that_fails_raises(monkeypatch):
    use_fake_builtin(monkeypatch)
    monkeypatch.setattr(_registry, "_import_plugin", broken_import)
    monkeypatch.setenv("MOEROUTER_BACKEND", "fakelib")
    with pytest.raises(ImportError, match="MOEROUTER_BACKEND='fakelib' asks for plugin"):
        _registry.backend_for(FakeArray())


def test_auto_selected_plugin_that_fails_warns_once(monkeypatch):
    use_fake_builtin(monkeypatch)
    monkeypatch.setattr(_registry, "_import_plugin", broken_import)
    with pytest.warns(RuntimeWarning, match="moerouter_fakelib' failed to load") as record:
        assert _registry.backend_for(FakeArray()) is None
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call must be silent
        assert _registry.kernel_for("dispatch", FakeArray()) is None


def test_builtin_plugin_not_installed_is_silent(monkeypatch):
    # moerouter_fakelib is simply absent: the agnostic path, no warning.
    use_fake_builtin(monkeypatch)
    monkeypatch.setitem(sys.modules, "moerouter_fakelib", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _registry.backend_for(FakeArray()) is None


def test_entry_point_plugin_is_found_lazily(monkeypatch):
    # An unknown array library: only now are entry points scanned, and the plugin is used.
    module = types.ModuleType("fake_moerouter_plugin")
    module.backend = mr.BackendInfo(name="fake", array_library="fakelib", kernels={"combine": noop})
    monkeypatch.setitem(sys.modules, "fake_moerouter_plugin", module)
    scans = []

    def entry_points():
        scans.append(1)
        return {"fake": "fake_moerouter_plugin:backend"}

    monkeypatch.setattr(_registry, "_entry_point_plugins", entry_points)
    _registry.backend_for(np.zeros(1))  # a built-in library: no scan
    assert scans == []
    assert _registry.kernel_for("combine", FakeArray()) is noop
    assert _registry.kernel_for("dispatch", FakeArray()) is None
    _registry.backend_for(FakeArray())  # cached: no second scan
    assert scans == [1]
    assert "fake" in _registry.known_plugins()


def test_plugin_must_expose_backend_info(monkeypatch):
    # A module whose "backend" is something else is a broken plugin, said plainly.
    module = types.ModuleType("fake_moerouter_plugin")
    module.backend = {"name": "fake"}
    monkeypatch.setitem(sys.modules, "fake_moerouter_plugin", module)
    with pytest.raises(TypeError, match=r"does not expose a moerouter\.BackendInfo"):
        _registry._import_plugin("fake_moerouter_plugin")


# ------------------------------------------------------------------------------- kernel sets


def gated_plugin(monkeypatch, verified_on=""):
    """A fakelib plugin whose dispatch belongs to a kernel set, and its set."""
    kernel_set = mr.KernelSet(
        name="fake-gpu", verified_on=verified_on, replaces=frozenset({"dispatch"})
    )
    info = mr.BackendInfo(
        name="fake",
        array_library="fakelib",
        kernels={"dispatch": noop, "combine": noop},
        kernel_sets=(kernel_set,),
    )
    monkeypatch.setitem(_registry._loaded, "fakelib", info)
    return kernel_set


@pytest.mark.parametrize(
    ("variable", "enabled"),
    [
        pytest.param(None, False, id="unset"),  # unverified kernels are off by default
        pytest.param("fake-gpu", True, id="by-name"),  # the documented override, one set
        pytest.param("other, fake-gpu", True, id="in-a-list"),  # several sets, spaces allowed
        pytest.param("all", True, id="all"),  # what tools/gpu-check sets
        pytest.param("fake", False, id="other-name"),  # a prefix is not the name
        pytest.param("", False, id="empty"),
    ],
)
def test_unverified_kernel_set_runs_only_when_asked_for(monkeypatch, variable, enabled):
    kernel_set = gated_plugin(monkeypatch)
    if variable is None:
        monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, variable)
    assert _registry.kernel_set_enabled(kernel_set) is enabled
    assert (_registry.kernel_for("dispatch", FakeArray()) is noop) is enabled
    # A kernel outside the set is not affected.
    assert _registry.kernel_for("combine", FakeArray()) is noop


def test_verified_kernel_set_is_on_without_the_variable(monkeypatch):
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    kernel_set = gated_plugin(monkeypatch, verified_on="NVIDIA H200, 2026-01-01")
    assert kernel_set.verified
    assert _registry.kernel_for("dispatch", FakeArray()) is noop


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        # The variable's values are names: no spaces, no commas.
        pytest.param({"name": "my set"}, ValueError, "KernelSet.name"),
        # A misspelt kernel name would never be switched off.
        pytest.param({"replaces": {"dispath"}}, ValueError, "unknown kernel names"),
    ],
)
def test_kernel_set_validation(options, error, match):
    with pytest.raises(error, match=match):
        mr.KernelSet(**{"name": "fake-gpu", **options})


def test_backend_info_rejects_a_set_replacing_a_missing_kernel():
    # A set that replaces a kernel the plugin does not provide would switch off nothing.
    kernel_set = mr.KernelSet(name="fake-gpu", replaces=frozenset({"combine"}))
    with pytest.raises(ValueError, match="replaces 'combine'"):
        mr.BackendInfo(
            name="fake", array_library="fakelib", kernels={"dispatch": noop},
            kernel_sets=(kernel_set,),
        )  # fmt: skip
    with pytest.raises(TypeError, match="must hold KernelSet"):
        mr.BackendInfo(name="fake", array_library="fakelib", kernel_sets=("fake-gpu",))


def test_info_shows_each_kernel_set(monkeypatch, capsys):
    # python -m moerouter info says which sets are off, and how to switch one on.
    from importlib.machinery import ModuleSpec

    from moerouter import __main__

    module = types.ModuleType("fake_moerouter_plugin")
    module.__spec__ = ModuleSpec("fake_moerouter_plugin", None)  # info asks find_spec
    module.backend = mr.BackendInfo(
        name="fake",
        array_library="fakelib",
        kernels={"dispatch": noop},
        kernel_sets=(
            mr.KernelSet(name="fake-gpu", replaces=frozenset({"dispatch"})),
            mr.KernelSet(name="fake-proven", verified_on="NVIDIA H200"),
        ),
    )
    monkeypatch.setitem(sys.modules, "fake_moerouter_plugin", module)
    monkeypatch.setattr(_registry, "BUILTIN_PLUGINS", {"fakelib": "fake_moerouter_plugin"})
    monkeypatch.setattr(_registry, "_entry_point_plugins", dict)
    monkeypatch.delenv(_registry.UNVERIFIED_KERNELS_VARIABLE, raising=False)
    assert __main__.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel set fake-gpu: off (has not passed on a GPU yet" in out
    assert "MOEROUTER_UNVERIFIED_KERNELS=fake-gpu switches it on" in out
    assert "kernel set fake-proven: on (passed on NVIDIA H200)" in out
    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "all")
    __main__.main(["info"])
    assert "kernel set fake-gpu: on, unverified" in capsys.readouterr().out


def test_use_backend_switches_paths_and_restores_the_environment(monkeypatch):
    from moerouter.testing import use_backend

    info = _registry.register(
        mr.BackendInfo(name="fakenumpy", array_library="numpy", kernels={"dispatch": noop})
    )
    array = np.zeros(3)
    monkeypatch.setenv(_registry.UNVERIFIED_KERNELS_VARIABLE, "earlier")
    with use_backend("reference"):
        assert _registry.kernel_for("dispatch", array) is None
        assert _registry._loaded == {}  # reset on entry
        assert os.environ["MOEROUTER_BACKEND"] == "reference"
        assert os.environ[_registry.UNVERIFIED_KERNELS_VARIABLE] == "earlier"  # left alone
    assert "MOEROUTER_BACKEND" not in os.environ
    assert _registry._loaded == {}  # reset on exit: plugins are looked up again
    _registry.register(info)
    with use_backend(unverified=("a", "b")):
        assert _registry.kernel_for("dispatch", array) is not noop  # the real NumPy plugin
        assert os.environ[_registry.UNVERIFIED_KERNELS_VARIABLE] == "a,b"
        with use_backend(unverified=()):
            assert _registry.UNVERIFIED_KERNELS_VARIABLE not in os.environ
        assert os.environ[_registry.UNVERIFIED_KERNELS_VARIABLE] == "a,b"
    assert os.environ[_registry.UNVERIFIED_KERNELS_VARIABLE] == "earlier"
    with pytest.raises(RuntimeError), use_backend("numpy"):
        assert os.environ["MOEROUTER_BACKEND"] == "numpy"
        raise RuntimeError
    assert "MOEROUTER_BACKEND" not in os.environ
    with pytest.raises(ValueError, match="non-empty string"), use_backend(""):
        pass


def test_use_backend_fixture_switches_back_and_forth(use_backend):
    use_backend("reference")
    assert os.environ["MOEROUTER_BACKEND"] == "reference"
    use_backend()
    assert "MOEROUTER_BACKEND" not in os.environ
    use_backend("reference")
