"""A full disk, a file-size limit, a run directory that cannot be used: one line naming the path
and the error, nothing half-written, ``run.json`` not left ``running``, and once there is room
again ``--resume`` ends bitwise equal to the reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import (
    PIPETRAIN,
    REPO,
    assert_bitwise_equal,
    cli_env,
    load_params,
    run_cli,
    run_state,
)

OPTIONS = ("--epochs", "2", "--quiet")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    def make(*options: str):
        run_dir = tmp_path_factory.mktemp("ref")
        run_cli("reference", "--run-dir", str(run_dir), *OPTIONS, *options, check=True)
        return load_params(run_dir)
    return make


def assert_nothing_half_written(run_dir: Path) -> None:
    leftovers = [p.name for p in run_dir.rglob(".*tmp-*")]
    assert leftovers == [], leftovers
    text = (run_dir / "events.jsonl").read_text()
    assert text.endswith("\n")
    for line in text.splitlines():
        json.loads(line)


def with_fsize_limit(limit_bytes: int, *args: str) -> subprocess.CompletedProcess:
    """``pipetrain ARGS`` under RLIMIT_FSIZE (set in a stub that then execs the command, as no
    preexec_fn may run in a process with threads)."""
    stub = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            f"({limit_bytes}, {limit_bytes})); os.execv(sys.executable, sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", stub, *PIPETRAIN, *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO, env=cli_env())


def test_a_file_size_limit_hit_by_a_checkpoint_fails_the_run_in_one_line(tmp_path, reference):
    """One stage holds the whole model: its segment (parameters and momentum) is twice
    initial.npz, so a 200 KB limit lets the run start and stops its first checkpoint. The
    stage reports the error to the coordinator (its own log is past the limit too)."""
    run_dir = tmp_path / "run"
    options = ("--stages", "1", "--checkpoint-every", "10")
    result = with_fsize_limit(200_000, "train", "--run-dir", str(run_dir), *OPTIONS, *options)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "segment-0.npz: File too large (EFBIG)" in lines[0], lines[0]
    state = run_state(run_dir)
    assert state["state"] == "failed" and "File too large" in state["error"]
    assert_nothing_half_written(run_dir)
    assert list((run_dir / "checkpoints").iterdir()) == []
    resumed = run_cli("train", "--run-dir", str(run_dir), "--resume", *OPTIONS, *options)
    assert resumed.returncode == 0, resumed.stderr
    assert_bitwise_equal(load_params(run_dir), reference(*options))


INSIDE = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    mount, out, cmd = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=True)
    run = mount / "run"
    first = subprocess.run([*cmd, "train", "--run-dir", str(run), *json.loads(sys.argv[4])],
                           capture_output=True, text=True)
    shutil.copytree(run, out / "after-full", ignore=shutil.ignore_patterns("*.npz"))
    subprocess.run(["mount", "-o", "remount,size=8m", str(mount)], check=True)
    again = subprocess.run([*cmd, "train", "--run-dir", str(run), "--resume",
                            *json.loads(sys.argv[4])], capture_output=True, text=True)
    shutil.copy(run / "final.npz", out / "final.npz")
    (out / "result.json").write_text(json.dumps({
        "first": [first.returncode, first.stderr], "again": [again.returncode, again.stderr]}))
""")


def mount_namespace() -> list[str] | None:
    """A way to mount a tmpfs of our own: root in a new mount namespace, or a user namespace."""
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "tmpfs", "/mnt"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_a_full_tmpfs_during_a_checkpoint(tmp_path, reference):
    prefix = mount_namespace() if shutil.which("unshare") else None
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (no mount namespace)")
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    options = ["--checkpoint-every", "10", *OPTIONS]
    subprocess.run([*prefix, sys.executable, "-c", INSIDE, str(mount), str(out),
                    json.dumps(PIPETRAIN), json.dumps(options)], check=True, cwd=REPO,
                   env=cli_env(), timeout=300)
    result = json.loads((out / "result.json").read_text())
    status, stderr = result["first"]
    assert status == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device (ENOSPC)" in lines[0], stderr
    after = out / "after-full"
    assert json.loads((after / "run.json").read_text())["state"] == "failed"
    assert_nothing_half_written(after)
    intact = sorted(p.name for p in (after / "checkpoints").iterdir())
    assert intact == ["step-00000010"], intact
    assert result["again"][0] == 0, result["again"][1]
    assert_bitwise_equal(load_params(out), reference("--checkpoint-every", "10"))


@pytest.mark.parametrize("where", ["file", "proc", "read-only"])
def test_a_run_directory_that_cannot_be_used_is_one_line_exit_2(tmp_path, where):
    if where == "file":
        run_dir = tmp_path / "a-file"
        run_dir.write_text("not a directory")
        result = run_cli("train", "--run-dir", str(run_dir), *OPTIONS)
    elif where == "proc":
        run_dir = Path("/proc/pipetrain-nope/run")
        result = run_cli("train", "--run-dir", str(run_dir), *OPTIONS)
    else:
        prefix = mount_namespace() if shutil.which("unshare") else None
        if prefix is None:
            pytest.skip("cannot mount a read-only file system here")
        mount = tmp_path / "ro"
        mount.mkdir()
        script = (f"mount -t tmpfs -o ro tmpfs {mount} && exec "
                  + " ".join(PIPETRAIN) + f" train --run-dir {mount}/run --epochs 2 --quiet")
        result = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True,
                                cwd=REPO, env=cli_env(), timeout=120)
        run_dir = mount / "run"
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(run_dir) in lines[0] and "cannot be used as a run directory" in lines[0]
