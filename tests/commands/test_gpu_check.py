"""tools/gpu-check without a GPU: its dry run, budgets, test parsing, report and wheels.

The kit proves the GPU paths on a machine lent for minutes; everything it does that needs no
GPU is checked here, so that a lent machine is never spent on a broken kit.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "tools" / "gpu-check"
BENCH = REPO / "tools" / "gpu_bench.py"


@pytest.fixture(scope="module")
def kit():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(KIT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_dry_run_lists_every_part_and_passes():
    # What CI runs: the parts, their budgets and commands, the benchmark cases; no framework.
    result = subprocess.run(
        [sys.executable, str(KIT), "--dry-run"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in (
        "tests-torch",
        "tests-jax",
        "tests-cupy",
        "bench-torch",
        "bench-jax",
        "bench-cupy",
    ):
        assert name in result.stdout
    assert "backends/cupy/tests/test_gpu.py" in result.stdout
    assert "mixtral T=16384 float32" in result.stdout  # the benchmark's dry run ran too
    assert os.access(KIT, os.X_OK)  # one executable, run as tools/gpu-check


def test_dry_run_fails_on_a_missing_test_file(kit, monkeypatch, capsys):
    gone = kit.Part("tests-torch", "tests", "torch", 80.0, ("backends/torch/tests/test_gone.py",))
    monkeypatch.setattr(kit, "PARTS", (gone, *kit.PARTS[1:]))
    assert kit.dry_run(sys.executable, 1.0, None) == 1
    err = capsys.readouterr().err
    assert "backends/torch/tests/test_gone.py is missing" in err
    # The files the missing part ran are now run by nobody: said too.
    assert "test_triton.py has gpu-marked tests but no part runs it" in err


def test_dry_run_fails_when_a_kernel_set_is_not_where_the_kit_looks(kit, monkeypatch):
    # The report tells where to write a proven set's verified_on: that file must declare it.
    monkeypatch.setitem(kit.KERNEL_SETS, "jax-pallas", ("backends/jax/moerouter_jax/_gone.py", ()))
    problems = kit.check_layout()
    assert any("kernel set jax-pallas is declared in" in problem for problem in problems)


def test_benchmark_dry_run_fails_when_a_kernel_is_missing(monkeypatch, capsys):
    # tools/gpu_bench.py checks, without importing a framework, that what it calls exists.
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", bench)
    spec.loader.exec_module(bench)
    assert bench.dry_run() == 0
    monkeypatch.setitem(
        bench.KERNELS["torch"], "backends/torch/moerouter_torch/_triton.py", ("topk_router", "gone")
    )
    assert bench.dry_run() == 1
    assert "_triton.py defines no gone" in capsys.readouterr().err


def test_benchmark_dry_run_imports_no_framework():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['gpu_bench.py', '--dry-run']\n"
        "try:\n"
        f"    runpy.run_path({str(BENCH)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "imported = {'torch', 'jax', 'cupy', 'triton'} & set(sys.modules)\n"
        "assert not imported, imported\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_kernel_set_is_proven_by_a_part(kit, monkeypatch):
    # A kernel set the kit does not know would never be reported as proven.
    declared = kit.declared_kernel_sets()
    assert set(declared) == set(kit.KERNEL_SETS)
    monkeypatch.delitem(kit.KERNEL_SETS, "cupy-cuda")
    assert any("cupy-cuda" in problem for problem in kit.check_layout())


def test_part_out_of_time_is_interrupted_then_killed_with_its_children(kit, monkeypatch, tmp_path):
    # A hung part is reported as timed out, and nothing it started survives it.
    monkeypatch.setattr(kit, "GRACE_SECONDS", 1.0)
    pid_file = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import signal, subprocess, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignores the polite request
        child = subprocess.Popen(["sleep", "600"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """)
    started = time.monotonic()
    returncode, timed_out, wall = kit.run_process(
        [sys.executable, "-c", code], dict(os.environ), 8.0, tmp_path / "log"
    )
    assert timed_out
    assert returncode == -signal.SIGKILL
    assert wall < 30 and time.monotonic() - started < 30
    child = int(pid_file.read_text())
    for _ in range(50):  # the orphan is reaped by init shortly after its kill
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child {child} outlived the part")


def test_stopping_the_kit_stops_the_running_part(tmp_path):
    # The kit's own SIGTERM (an outer timeout, say) must not leave a part running on the GPU.
    pid_file, log = tmp_path / "part.pid", str(tmp_path / "log")
    part = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    script = textwrap.dedent(f"""
        import importlib.machinery, importlib.util, signal, sys
        loader = importlib.machinery.SourceFileLoader("gpu_check", {str(KIT)!r})
        spec = importlib.util.spec_from_loader("gpu_check", loader)
        kit = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = kit
        loader.exec_module(kit)
        signal.signal(signal.SIGTERM, kit._exit_on_signal)
        kit.run_process([sys.executable, "-c", {part!r}], {{}}, 600.0, kit.Path({log!r}))
    """)
    kit_process = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    kit_process.send_signal(signal.SIGTERM)
    assert kit_process.wait(timeout=30) == 128 + signal.SIGTERM
    part_pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(part_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part {part_pid} outlived the kit")


FAKE_TESTS = """
import time
import pytest

pytestmark = pytest.mark.gpu


def test_passes():
    pass


def test_fails():
    assert 1 == 2, "wrong on the GPU"


@pytest.mark.skip(reason="no such device")
def test_skipped():
    pass


@pytest.mark.parametrize("size", [1, 2])
def test_param(size):
    pass


def test_zz_hangs():
    time.sleep(600)
"""


@pytest.fixture
def fake_project(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nmarkers = ["gpu: needs a GPU"]\naddopts = "--strict-markers"\n'
    )
    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)
    return tmp_path


def test_test_part_reports_each_outcome_and_the_hung_test(kit, monkeypatch, fake_project):
    monkeypatch.setattr(kit, "GRACE_SECONDS", 3.0)
    part = kit.Part("tests-fake", "tests", "torch", 0.0, ("test_fake.py",))
    log = fake_project / "all.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = kit.run_part(part, sys.executable, env, 20.0, fake_project, log, cwd=fake_project)
    outcomes = {test.id: test.outcome for test in result.tests}
    assert result.status == "timed out"
    assert outcomes == {
        "test_fake.py::test_passes": "passed",
        "test_fake.py::test_fails": "failed",
        "test_fake.py::test_skipped": "skipped",
        "test_fake.py::test_param[1]": "passed",
        "test_fake.py::test_param[2]": "passed",
        "test_fake.py::test_zz_hangs": "running when stopped",
    }
    failed = next(test for test in result.tests if test.outcome == "failed")
    assert "wrong on the GPU" in failed.message
    assert "===== tests-fake" in log.read_text()


def test_parsers_agree_on_a_finished_run(kit, fake_project):
    # Without the hang, junit (authoritative) and the -v log give the same outcomes.
    (fake_project / "test_fake.py").write_text(FAKE_TESTS.replace("time.sleep(600)", "pass"))
    junit = fake_project / "out.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v",
         f"--junitxml={junit}", "test_fake.py"],
        cwd=fake_project, capture_output=True, text=True,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )  # fmt: skip
    from_junit = {t.id: t.outcome for t in kit.parse_junit(junit, fake_project)}
    from_log = {t.id: t.outcome for t in kit.parse_verbose_log(result.stdout)}
    assert from_junit == from_log
    assert from_junit["test_fake.py::test_zz_hangs"] == "passed"


def fake_report(kit):
    test_ids = [
        ("backends/torch/tests/test_triton.py::test_gpu_public_api_matches_cpu[x]", "passed"),
        ("backends/torch/tests/test_nn.py::test_gpu_grouped_mlp_matches_float64_loop[y]", "failed"),
    ]
    tests_part = kit.PartResult("tests-torch", "tests", "torch", 80.0, status="failed")
    tests_part.tests = [
        kit.Outcome(i, o, 0.1, "boom" if o == "failed" else None) for i, o in test_ids
    ]
    bench_part = kit.PartResult("bench-torch", "bench", "torch", 60.0, status="passed")
    bench_part.figures = [
        {"kind": "environment", "device": "NVIDIA H200", "kernel_path": "triton", "versions": {}},
        {"kind": "roof", "roof": "device copy", "bytes": 2 << 30, "ms": 0.5, "gb_per_s": 4300.0},
        {"kind": "figure", "op": "dispatch", "path": "triton", "shape": "olmoe", "tokens": 4096,
         "dtype": "bfloat16", "ms": 0.05, "gb_per_s": 3500.0, "fraction_of_copy": 0.81,
         "baseline": "x[idx]", "baseline_ms": 0.06, "speedup": 1.2, "target": 0.8,
         "meets_target": True, "check": "ok"},
        {"kind": "skipped", "op": "grouped_mlp", "config": "mixtral T=16384 float32",
         "reason": "budget spent"},
    ]  # fmt: skip
    environment = {
        "versions": {"python": "3.12.3", "torch": "2.11.0+cu130", "triton": "3.6.0"},
        "devices": {"torch": "NVIDIA H200 (sm_90, CUDA 13.0)"},
        "platform": "Linux",
        "problems": {"cupy": "cupy is not installed"},
    }
    parts = [tests_part, bench_part]
    from dataclasses import asdict

    return {
        "started": "2026-01-01T00:00:00+00:00",
        "command": "tools/gpu-check --out x",
        "commit": "abc1234",
        "budget_s": 465.0,
        "wall_s": 400.0,
        "status": "failed",
        "environment": environment,
        "parts": [asdict(part) for part in parts],
        "kernel_sets": kit.kernel_set_verdicts(parts, environment),
    }


def test_report_says_what_ran_and_what_may_be_marked_verified(kit, tmp_path):
    report = fake_report(kit)
    verdicts = report["kernel_sets"]
    assert verdicts["torch-triton"]["proven"]  # its one test passed
    assert not verdicts["torch-grouped-mm"]["proven"]  # its one test failed
    assert not verdicts["jax-pallas"]["proven"]  # none of its tests ran
    assert "NVIDIA H200" in verdicts["torch-triton"]["verified_on"]
    assert "torch 2.11.0+cu130, triton 3.6.0" in verdicts["torch-triton"]["verified_on"]
    kit.write_report(report, tmp_path)
    assert json.loads((tmp_path / "gpu-report.json").read_text())["commit"] == "abc1234"
    text = (tmp_path / "gpu-report.md").read_text()
    assert "# moerouter GPU check: NVIDIA H200 (sm_90, CUDA 13.0)" in text
    assert "cupy is not installed" in text
    assert "test_gpu_grouped_mlp_matches_float64_loop[y]` (failed)" in text and "boom" in text
    assert "`torch-triton` in `backends/torch/moerouter_torch/_ops.py`" in text
    assert "| dispatch | olmoe | 4096 | bfloat16 | triton | 0.05 |" in text
    assert "skipped: grouped_mlp mixtral T=16384 float32: budget spent" in text
    assert "targets met 1 of 1 (dispatch 0.8 of copy)" in text
    assert "| dispatch |" not in kit.markdown(report, benchmarks=False)  # the printed summary


def test_version_problems_say_exactly_which_is_too_old(kit):
    required = kit.requirements()
    assert any(r.module == "torch" for r in required)  # read from backends/torch/pyproject.toml
    versions = {"numpy": "2.5.2", "torch": "2.3.1+cu121", "jax": None, "cupy": "14.2.0"}
    problems = kit.version_problems(versions, required)
    assert problems["torch"].startswith("torch 2.3.1+cu121 is older than torch>=")
    assert "backends/torch/pyproject.toml" in problems["torch"]
    assert problems["jax"].startswith("jax is not installed")
    assert "numpy" not in problems and "cupy" not in problems
    assert kit.version_tuple("0.11.2") > kit.version_tuple("0.4.35")  # numbers, not strings


def test_only_missing_or_old_packages_come_from_wheels(kit):
    required = kit.requirements()
    versions = {
        "array_api_compat": "1.16.0",
        "array_api_strict": None,  # missing: from the wheel folder
        "pytest": "7.4.0",  # older than pytest>=8: from the wheel folder, with missing deps
        "pluggy": "1.5.0",
        "iniconfig": None,
        "packaging": "24.0",
        "pygments": "2.18.0",
        "hypothesis": "6.100.0",
    }
    assert kit.wheels_to_unpack(versions, required) == ["array-api-strict", "pytest", "iniconfig"]


def test_wheels_unpack_without_pip_or_network(kit, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "array_api_strict-2.6.1-py3-none-any.whl", "w") as archive:
        archive.writestr("array_api_strict/__init__.py", "__version__ = '2.6.1'\n")
    site = tmp_path / "site"
    assert kit.unpack_wheels(["array-api-strict"], wheels, site) == []
    assert (site / "array_api_strict" / "__init__.py").is_file()
    assert "no wheel for pytest" in kit.unpack_wheels(["pytest"], wheels, site)[0]
    assert "--download-wheels" in kit.unpack_wheels(["pytest"], None, site)[0]


def test_probe_sees_what_the_wheels_add(kit, tmp_path):
    # After unpacking wheels the kit probes again: that probe, not the first, is what counts.
    site = tmp_path / "site"
    site.mkdir()
    env = kit._environment({}, site)
    before = kit.probe(sys.executable, env, tmp_path, light=True)["versions"]["array_api_strict"]
    (site / "array_api_strict").mkdir()
    (site / "array_api_strict" / "__init__.py").write_text("__version__ = '9.9.9'\n")
    after = kit.probe(sys.executable, env, tmp_path, light=True)["versions"]["array_api_strict"]
    assert before != "9.9.9" and after == "9.9.9"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_benchmark_code_runs_in_smoke_mode(framework, tmp_path):
    # Every case of the GPU benchmark, at tiny shapes on the CPU (Triton's and Pallas's
    # interpreters): a typo in a path that only runs on a GPU would show here first.
    pytest.importorskip(framework)
    if framework == "torch":
        pytest.importorskip("triton")
    out = tmp_path / "figures.jsonl"
    env = {**os.environ, "MOEROUTER_UNVERIFIED_KERNELS": "all"}
    result = subprocess.run(
        [sys.executable, str(BENCH), "--framework", framework, "--smoke", "--out", str(out),
         "--budget", "600"],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    figures = [r for r in records if r["kind"] == "figure"]
    assert {r["kind"] for r in records} == {"environment", "roof", "figure"}
    ops = {"dispatch", "combine", "dispatch_backward", "combine_backward", "make_plan"}
    assert {f["op"] for f in figures} == {*ops, "router", "grouped_mlp"}
    assert len(figures) == 2 * 7  # two configurations, every op
    assert all(f.get("check", "ok") == "ok" for f in figures), figures
