"""What ``pip install .`` puts into site-packages, and a working directory that cannot shadow it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env, load_params, run_state

SCENARIO = """
name = "from-a-crowded-folder"
description = "a scenario run from a folder holding modules named like pipetrain's"
seed = 1

[train]
stages = 2
epochs = 1

[[faults]]
kind = "kill"
target = "stage:1"
at_step = 5

[expect]
equivalence = "bitwise"
restarts = 1
"""


def build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the source (building in place would write into the checkout)."""
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name if source.exists() else _mkdir(source) / name)
    for name in ("system", "harness", "scenarios", "bench"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("pipetrain-*.whl")
    return wheel


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_the_wheel_installs_pipetrain_and_its_harness_and_no_generic_name(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {
        "pipetrain", "pipetrain_harness"}
    # Every module of the source tree is in it, under its installed name, with the digits.
    for root, package in ((REPO / "system", "pipetrain"), (REPO / "harness", "pipetrain_harness")):
        for path in root.rglob("*.py"):
            assert f"{package}/{path.relative_to(root).as_posix()}" in names, path
    assert "pipetrain/data/digits.csv.gz" in names
    for path in (REPO / "scenarios").glob("*.toml"):  # the scenarios ship with the harness
        assert f"pipetrain_harness/scenarios/{path.name}" in names, path
    for path in (REPO / "bench").glob("*.py"):  # and the benchmark suite
        assert f"pipetrain_harness/bench/{path.name}" in names, path
    assert not any(name.endswith((".png", ".json")) and "/bench/" in name for name in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        scripts = archive.read(entry_points).decode()
    assert "pipetrain = pipetrain.cli:main" in scripts
    assert "pipetrain-harness = pipetrain_harness.__main__:main" in scripts


@pytest.fixture
def crowded(tmp_path) -> Path:
    """A working directory full of modules that would shadow pipetrain's if they could."""
    folder = tmp_path / "crowded"
    for package in ("system", "harness", "pipetrain_harness"):
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text("raise SystemExit('shadowed!')\n")
    for module in ("system.py", "pipetrain.py", "numpy.py"):
        (folder / module).write_text("raise SystemExit('shadowed!')\n")
    return folder


def script(name: str) -> str:
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        pytest.skip(f"{name} is not installed as a script here (pip install . puts it there)")
    return str(path)


def test_train_from_a_folder_that_would_shadow_it(crowded):
    run_dir = crowded / "run"
    result = subprocess.run(
        [script("pipetrain"), "train", "--stages", "2", "--epochs", "1", "--quiet",
         "--run-dir", str(run_dir)], cwd=crowded, env=cli_env(), capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "shadowed" not in result.stderr
    assert run_state(run_dir)["state"] == "done"
    assert load_params(run_dir)  # the workers, started in this folder too, trained


def test_a_scenario_from_a_folder_that_would_shadow_it(crowded):
    (crowded / "scenario.toml").write_text(SCENARIO)
    result = subprocess.run(
        [script("pipetrain-harness"), "run", "scenario.toml", "--report-dir", "reports"],
        cwd=crowded, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "shadowed" not in result.stdout + result.stderr
    assert (crowded / "reports" / "from-a-crowded-folder" / "report.html").exists()


def test_installed_harness_lists_its_shipped_scenarios_from_anywhere(tmp_path):
    """Installed from the wheel, away from the source tree, `pipetrain-harness list` finds the
    scenarios in the package, and the fuzzer's default save directory is not in it."""
    wheel = build_wheel(tmp_path)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = cli_env(PYTHONPATH=str(target))
    result = subprocess.run([sys.executable, "-m", "pipetrain_harness", "list"], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()}
    assert listed == {path.stem for path in (REPO / "scenarios").glob("*.toml")}
    shown = subprocess.run([sys.executable, "-c", "import pipetrain_harness.__main__ as m; "
                            "print(m.default_scenarios()); print(m.build_parser().parse_args("
                            "['fuzz', '--seconds', '1']).save_dir)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=60)
    scenarios, save_dir = shown.stdout.split()
    assert scenarios.startswith(str(target)), scenarios
    assert save_dir == "reports/fuzz/found"
    # The installed benchmark suite answers, and would write into the working directory.
    bench = subprocess.run([sys.executable, "-m", "pipetrain_harness.bench.run", "--help"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert bench.returncode == 0, bench.stderr
    assert "(default: bench-results)" in bench.stdout
