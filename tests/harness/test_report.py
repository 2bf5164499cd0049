"""pipetrain_harness.report: report.json, the self-contained report.html, the terminal summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipetrain.run.rundir import save_params
from pipetrain_harness.checks import CheckResult, RunOutcome
from pipetrain_harness.history import History
from pipetrain_harness.report import summary_table, write_report
from pipetrain_harness.scenario import Expect, Scenario

DESCRIPTION = 'kills a worker <script>alert("x")</script> & checks'


def fake_run(path: Path, steps: int, *, restart_at: int | None = None) -> list[dict]:
    path.mkdir(parents=True)
    events = [{"t": 100.0, "event": "run_start"}]
    for step in range(1, steps + 1):
        events.append({"t": 100.0 + step, "event": "step", "step": step, "epoch": 0,
                       "loss": 2.5 / step, "grad_digest": f"{step:064d}"})
        if step == restart_at:
            events.append({"t": 100.5 + step, "event": "restart", "from_step": step - 1})
            events.append({"t": 100.6 + step, "event": "step", "step": step, "epoch": 0,
                           "loss": 2.5 / step, "grad_digest": f"{step:064d}"})
    events.append({"t": 100.0 + steps + 1, "event": "run_end", "status": "done"})
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (path / "run.json").write_text(json.dumps({"state": "done"}))
    save_params(path / "final.npz", {"layers.0.weight": np.zeros((2, 2))})
    return events


def make_outcome(tmp_path: Path) -> tuple[RunOutcome, list[CheckResult]]:
    scenario = Scenario(path=Path("scenarios/kill.toml"), name="kill-worker",
                        description=DESCRIPTION, seed=4, train={}, faults=[], expect=Expect())
    history = History()
    history.add_run_events(fake_run(tmp_path / "run", 8, restart_at=4))
    fake_run(tmp_path / "reference", 8)
    history.entries.append({"t": 103.2, "source": "harness", "op": "fault_invoke",
                            "fault": "kill(target=<stage:1>)", "step": 3})
    history.entries.append({"t": 103.3, "source": "harness", "op": "fault_heal",
                            "fault": "kill(target=<stage:1>)", "step": 3})
    samples = []
    for i in range(10):
        samples.append({"t": 100.0 + i, "pid": 50, "role": "coordinator", "cpu_percent": 5.0,
                        "rss": 60 * 2**20, "num_fds": 9})
        samples.append({"t": 100.0 + i, "pid": 51, "role": "worker", "cpu_percent": 90.0 + i,
                        "rss": (70 + i) * 2**20, "num_fds": 7})
    outcome = RunOutcome(
        scenario=scenario, run_dir=tmp_path / "run", exit_status=0, stderr="", wall_s=9.25,
        history=history, monitor_samples=samples, peak_rss_mb={50: 60.0, 51: 79.0},
        leaks=["process left behind: pid 77 (sleep) sleep 300 <&>"], launches=1,
        reference_dir=tmp_path / "reference",
    )
    results = [CheckResult("exit_status", "valid", "exit status 0 (expected 0)"),
               CheckResult("equivalence", "invalid", "first differing step 3 <b>"),
               CheckResult("no_leaks", "unknown", "the check crashed: OSError: x")]
    return outcome, results


def test_write_report(tmp_path):
    outcome, results = make_outcome(tmp_path)
    report = write_report(outcome, results, tmp_path / "reports",
                          "python -m pipetrain_harness run scenarios/kill.toml --seed 4")
    out = tmp_path / "reports" / "kill-worker"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report, default=str))
    assert report["verdict"] == "invalid"
    assert report["scenario"] == {"name": "kill-worker", "path": "scenarios/kill.toml",
                                  "seed": 4, "description": DESCRIPTION}
    assert [c["name"] for c in report["checks"]] == ["exit_status", "equivalence", "no_leaks"]
    assert report["restarts"] == 1 and report["exit_status"] == 0 and report["wall_s"] == 9.25
    assert report["reproduce"].endswith("--seed 4")
    times = [e["t"] for e in report["history"]]
    assert times == sorted(times) and len(report["history"]) == len(outcome.history.entries)
    worker = next(p for p in report["processes"] if p["pid"] == 51)
    assert worker["role"] == "worker" and worker["peak_rss_mb"] == 79.0
    assert worker["max_cpu_percent"] == 99.0 and worker["mean_cpu_percent"] == 94.5
    assert report["summary"] == {"scenario": "kill-worker", "verdict": "invalid",
                                 "wall_s": 9.2, "restarts": 1, "peak_rss_mb": 79.0,
                                 "failed": ["equivalence", "no_leaks"]}

    page = (out / "report.html").read_text()
    for name in ("exit_status", "equivalence", "no_leaks", "fault_invoke", "fault_heal"):
        assert name in page
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)" in page
    assert "<b>" not in page and "sleep 300 &lt;&amp;&gt;" in page
    assert "kill(target=&lt;stage:1&gt;)" in page
    assert "python -m pipetrain_harness run scenarios/kill.toml --seed 4" in page


def test_report_has_plots(tmp_path):
    pytest.importorskip("matplotlib")
    outcome, results = make_outcome(tmp_path)
    write_report(outcome, results, tmp_path, "reproduce")
    page = (tmp_path / "kill-worker" / "report.html").read_text()
    # loss, run minus reference, throughput, CPU, memory (no stage timings in these events)
    assert page.count('src="data:image/png;base64,') == 5
    assert "plots failed" not in page
    assert "8 of 8 steps with equal gradient digests; loss difference exactly 0 at 8" in page


def test_history_is_folded_and_runs_of_steps_are_one_row(tmp_path):
    outcome, results = make_outcome(tmp_path)
    write_report(outcome, results, tmp_path, "reproduce")
    page = (tmp_path / "kill-worker" / "report.html").read_text()
    history = page[page.index("<h2>History</h2>"):]
    assert history.count("<details>") >= 3 and "entries in" in history
    assert "steps 1–3 (3)" in history and "steps 4–8 (5)" in history  # split by the faults
    assert '<tr class="harness">' in history  # the fault operations stand out


def test_processes_are_named_by_their_most_specific_role():
    from pipetrain_harness.report import process_summaries

    samples = [{"t": 1.0, "pid": 7, "role": "worker"},
               {"t": 2.0, "pid": 7, "role": "stage 1/3 replica 0", "rss": 2**20},
               {"t": 3.0, "pid": 7, "role": "python3", "status": "zombie", "rss": 0}]
    [summary] = process_summaries(samples)
    assert summary["role"] == "stage 1/3 replica 0" and summary["peak_rss_mb"] == 1.0


def test_timeline_marks_restarts_checkpoints_landings_and_replayed_steps(tmp_path):
    from pipetrain_harness.report_plots import timeline

    outcome, _ = make_outcome(tmp_path)
    history = outcome.history.sorted() + [
        {"t": 103.25, "source": "harness", "op": "fault_landed", "step": 4, "point": "1B2"}]
    line = timeline(outcome.run_events(), history, outcome.monitor_samples)
    kinds = {mark.kind: mark for mark in line.marks}
    assert set(kinds) == {"restart", "fault_invoke", "fault_heal", "fault_landed"}
    assert kinds["restart"].step == 3 and kinds["fault_landed"].step == 4
    assert line.replayed == [(4, 4)]
    assert line.t0 == 100.0


def test_report_of_a_plain_run_directory(tmp_path):
    pytest.importorskip("matplotlib")
    from pipetrain_harness.report import write_run_report

    fake_run(tmp_path / "run", 6, restart_at=3)
    fake_run(tmp_path / "reference", 6)
    page_path = write_run_report(tmp_path / "run", reference_dir=tmp_path / "reference")
    assert page_path == tmp_path / "run" / "report.html"
    page = page_path.read_text()
    assert page.count('src="data:image/png;base64,') == 3  # loss, difference, throughput
    assert "run minus reference" in page and "restart" in page
    assert "no monitor sampled" not in page  # no worker_exit events: no process table


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    outcome, results = make_outcome(tmp_path)
    write_report(outcome, results, tmp_path, "reproduce")
    page = (tmp_path / "kill-worker" / "report.html").read_text()
    assert "matplotlib is not installed" in page and "data:image/png" not in page
    assert "equivalence" in page


def test_report_of_a_run_that_left_nothing(tmp_path):
    outcome, results = make_outcome(tmp_path)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    outcome.run_dir, outcome.history, outcome.monitor_samples = empty, History(), []
    outcome.reference_dir, outcome.peak_rss_mb = None, {}
    report = write_report(outcome, results, tmp_path / "r", "reproduce")
    assert report["restarts"] == 0 and report["summary"]["peak_rss_mb"] == 0.0
    assert (tmp_path / "r" / "kill-worker" / "report.html").exists()


def test_summary_table():
    rows = [
        {"scenario": "kill-worker", "verdict": "valid", "wall_s": 12.34, "restarts": 1,
         "peak_rss_mb": 80.25, "failed": []},
        {"summary": {"scenario": "signal-storm-long-name", "verdict": "invalid", "wall_s": 3.0,
                     "restarts": 0, "peak_rss_mb": 61.0, "failed": ["equivalence", "no_leaks"]}},
        {"scenario": "broken", "verdict": "unknown"},
    ]
    lines = summary_table(rows).splitlines()
    assert lines[0].split() == ["scenario", "verdict", "wall", "s", "restarts", "peak", "RSS",
                                "MB", "failed", "checks"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["kill-worker", "valid", "12.3", "1", "80.2", "-"]
    assert lines[3].split() == ["signal-storm-long-name", "invalid", "3.0", "0", "61.0",
                                "equivalence,", "no_leaks"]
    assert lines[4].split()[:3] == ["broken", "unknown", "-"]
    # columns line up
    assert lines[2].index("valid") == lines[3].index("invalid") == lines[0].index("verdict")
