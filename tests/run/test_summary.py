"""pipetrain.run.summary: `pipetrain status` from run.json and the events: elapsed, ETA,
restarts, rounded numbers, and only the pids of processes that are alive."""

from __future__ import annotations

import os
import subprocess
import sys

from pipetrain.run.summary import format_summary, summarize


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


def test_a_running_run(tmp_path):
    gone = dead_pid()
    state = {"state": "running", "command": "train", "step": 100, "total_steps": 400,
             "epoch": 4, "last_loss": 0.412345678, "samples_per_s": 6550.81230968465,
             "accuracy": None, "coordinator_pid": os.getpid(), "worker_pids": [os.getpid(), gone],
             "restarts": 2, "config": {"batch_size": 64, "epochs": 20}}
    events = [{"t": 1000.0, "event": "run_start"},
              {"t": 1011.0, "event": "evaluate", "accuracy": 0.5},
              {"t": 1012.0, "event": "evaluate", "accuracy": 0.75}]
    # No step event yet: the rate is run.json's.
    assert summarize(state, events, now=1030.0)["eta_s"] == round(300 * 64 / 6550.81230968465, 3)
    # Step events (fresher than run.json) give the step and the rate: 4 steps/s, a 1 s pause
    # cut out.
    events += [{"t": 1026.0, "event": "step", "step": 98},
               {"t": 1026.0, "event": "paused", "step": 98},
               {"t": 1027.0, "event": "resumed", "step": 98},
               {"t": 1027.25, "event": "step", "step": 99},
               {"t": 1027.5, "event": "step", "step": 100, "loss": 0.412345678}]
    summary = summarize(state, events, now=1030.0)
    assert summary["elapsed_s"] == 30.0
    assert summary["samples_per_s"] == 4 * 64
    assert summary["eta_s"] == 300 / 4
    assert summary["restarts"] == 2 and summary["best_accuracy"] == 0.75
    assert summary["coordinator_pid"] == os.getpid()
    assert summary["worker_pids"] == [os.getpid()]  # the dead one is left out
    text = format_summary(summary, tmp_path)
    assert "None" not in text and "6550.81" not in text
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["step"] == "100/400 (25%)" and lines["epoch"] == "4/20"
    assert lines["samples/s"] == "256" and lines["loss"] == "0.4123"
    assert lines["elapsed"] == "0:30" and lines["ETA"] == "1:15" and lines["restarts"] == "2"
    assert lines["workers"] == str(os.getpid())


def test_a_finished_run_with_its_processes_gone(tmp_path):
    gone = dead_pid()
    state = {"state": "done", "step": 22, "total_steps": 22, "epoch": 1,
             "coordinator_pid": gone, "worker_pids": [gone], "samples_per_s": 5000.0}
    events = [{"t": 50.0, "event": "run_start"}, {"t": 62.5, "event": "run_end"}]
    summary = summarize(state, events, now=9999.0)
    assert summary["elapsed_s"] == 12.5 and summary["eta_s"] is None
    assert summary["coordinator_pid"] is None and summary["worker_pids"] == []
    text = format_summary(summary, tmp_path)
    assert "not running" in text and "none running" in text and "None" not in text
