"""A new user's first hour, through the real command line: the terminal (a pty), --quiet,
process titles and `status` of a live run, a stop and its resume command, more --epochs on
--resume, metrics.csv, TensorBoard scalars, `plot`, `report`, shell completion."""

from __future__ import annotations

import os
import pty
import re
import select
import struct
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pipetrain.run.metrics import read_metrics
from pipetrain_harness.plan import Plan
from tests.helpers import (
    PIPETRAIN,
    REPO,
    assert_bitwise_equal,
    cli_env,
    load_params,
    run_cli,
    run_state,
    start_cli,
    step_events,
    wait_for,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(*args: str, timeout_s: float = 120) -> tuple[int, str, str]:
    """``pipetrain ARGS`` with stderr on a pseudo-terminal (as in a shell); (status, stdout,
    what the terminal received)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*PIPETRAIN, *args], stdout=subprocess.PIPE, stderr=slave,
                                stdin=subprocess.DEVNULL, env=cli_env(COLUMNS="120"),
                                cwd=REPO)
        os.close(slave)
        slave = -1
        received = bytearray()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
            elif proc.poll() is not None:
                break
        stdout = proc.stdout.read().decode()
        proc.stdout.close()
        return proc.wait(timeout=30), stdout, received.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


def test_on_a_terminal_the_bar_clears_itself_and_events_have_lines_of_their_own(tmp_path):
    run_dir = tmp_path / "run"
    status, stdout, screen = run_in_pty("train", "--epochs", "2", "--stages", "2",
                                        "--checkpoint-every", "30", "--run-dir", str(run_dir))
    assert status == 0, screen
    assert stdout == f"run directory: {run_dir}\n"
    assert "\x1b[2K" in screen  # the bar's line is erased before anything else is written
    text = ANSI.sub("", screen).replace("\r\n", "\n")
    assert "samples/s" in text and "elapsed" in text and "ETA" in text
    lines = text.split("\n")
    for wanted in ("epoch 1/2  train loss ", "epoch 2/2  train loss ",
                   f"checkpoint at step 30: {run_dir}/checkpoints/step-00000030", "done in "):
        # each one starts a line, or follows the carriage return of the erased bar
        assert any(line.split("\r")[-1].startswith(wanted) for line in lines), wanted
    assert not re.search(r"samples/s\S", text)  # nothing glued onto the rate
    assert "Traceback" not in text


def test_quiet_still_prints_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "--epochs", "1", "--stages", "2", "--quiet", "--run-dir",
                     str(run_dir), check=True)
    assert result.stdout == f"run directory: {run_dir}\n"
    assert result.stderr == ""


def titles(pids: list[int]) -> list[str]:
    return [" ".join(psutil.Process(pid).cmdline()).strip() for pid in pids]


def test_a_live_run_named_in_ps_its_status_and_a_stop_that_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    env = cli_env(Plan(step_delay_s=0.05))  # slow enough to be looked at
    proc = start_cli("train", "--epochs", "3", "--stages", "2", "--run-dir", str(run_dir),
                     env=env)
    try:
        wait_for(lambda: len(step_events(run_dir)) >= 5, timeout_s=60, what="five steps")
        state = run_state(run_dir)
        workers = state["worker_pids"]
        assert titles(workers) == ["pipetrain: stage 0/2 replica 0",
                                   "pipetrain: stage 1/2 replica 0"]
        assert titles([proc.pid]) == [f"pipetrain: coordinator {run_dir}"]
        live = run_cli("status", str(run_dir))
        assert live.returncode == 0, live.stderr
        fields = dict(line.split(None, 1) for line in live.stdout.splitlines())
        assert fields["state"] == "running" and fields["restarts"] == "0"
        assert fields["workers"].split() == [str(pid) for pid in workers]
        assert fields["coordinator"] == str(proc.pid)
        assert re.fullmatch(r"\d+:\d\d", fields["elapsed"]), fields
        assert re.fullmatch(r"\d+:\d\d", fields["ETA"]), fields
        assert "None" not in live.stdout
        run_cli("stop", str(run_dir), check=True)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    stopped = run_state(run_dir)["step"]
    assert (f"stopped at step {stopped} (on request); continue with: pipetrain train --resume "
            f"--run-dir {run_dir}") in stderr
    after = run_cli("status", str(run_dir))
    fields = dict(line.split(None, 1) for line in after.stdout.splitlines())
    assert fields["state"] == "stopped"
    assert fields["workers"] == "none running" and fields["coordinator"] == "not running"


def test_more_epochs_on_resume_continue_a_finished_run_bitwise(tmp_path):
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    run_cli("train", "--epochs", "2", "--stages", "2", "--checkpoint-every", "22", "--quiet",
            "--run-dir", str(run_dir), check=True)
    more = run_cli("train", "--resume", "--epochs", "3", "--run-dir", str(run_dir))
    assert more.returncode == 0, more.stderr
    run_cli("reference", "--epochs", "3", "--quiet", "--run-dir", str(reference), check=True)
    assert_bitwise_equal(load_params(run_dir), load_params(reference))
    state = run_state(run_dir)
    assert state["state"] == "done" and state["step"] == state["total_steps"] == 66
    rows = read_metrics(run_dir / "metrics.csv")
    assert [row["step"] for row in rows] == list(range(1, 67))  # appended across launches
    assert rows[0]["stage1_compute_s"] > 0
    assert [row["eval_accuracy"] is not None for row in rows].count(True) == 3
    fewer = run_cli("train", "--resume", "--epochs", "3", "--run-dir", str(run_dir))
    assert fewer.returncode == 2 and "already finished" in fewer.stderr


def test_plot_and_report_of_a_plain_run(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir, reference = tmp_path / "run", tmp_path / "reference"
    run_cli("train", "--epochs", "2", "--stages", "2", "--quiet", "--run-dir", str(run_dir),
            check=True)
    run_cli("reference", "--epochs", "2", "--quiet", "--run-dir", str(reference), check=True)
    plotted = run_cli("plot", str(run_dir), check=True)
    png = run_dir / "plot.png"
    assert plotted.stdout == f"plot: {png}\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (width, height) == (1000, 850)
    reported = run_cli("report", str(run_dir), "--reference", str(reference), check=True)
    page = run_dir / "report.html"
    assert reported.stdout == f"report: {page}\n"
    html = page.read_text()
    # loss, run minus reference, throughput, per-stage times
    assert html.count('src="data:image/png;base64,') == 4
    assert "44 of 44 steps with equal gradient digests; loss difference exactly 0 at 44" in html
    assert "stage 1 (layers " in html  # the workers' exits, by role


def tensorboard_tags(log_dir: Path) -> set[str]:
    """The scalar tags in TensorBoard event files, read record by record (length, CRC, data,
    CRC) with tensorboardX's protobuf."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in log_dir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(value.tag for value in event.summary.value)
            offset += 12 + length + 4
    return tags


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    run_dir = tmp_path / "run"
    run_cli("train", "--epochs", "1", "--stages", "2", "--quiet", "--tensorboard",
            "--run-dir", str(run_dir), check=True)
    assert {"train/loss", "train/samples_per_s", "eval/loss", "eval/accuracy",
            "stage0/compute_s", "stage1/wait_s"} <= tensorboard_tags(run_dir / "tensorboard")


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_completion(tmp_path, shell):
    script = run_cli("completion", shell, check=True).stdout
    assert "pipetrain" in script and ("complete" in script or "compdef" in script)
    out = tmp_path / "completions"
    line = "pipetrain train --epo"
    env = cli_env(_ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
                  _ARGCOMPLETE_STDOUT_FILENAME=str(out), _ARGCOMPLETE_SHELL=shell)
    subprocess.run([*PIPETRAIN, "train"], env=env, capture_output=True, timeout=60, cwd=REPO)
    assert "--epochs" in out.read_text()
