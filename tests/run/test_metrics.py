"""pipetrain.run.metrics: recent throughput (pauses cut out, restarts start afresh), epoch
means (a replayed step counts once), per-stage timings and metrics.csv."""

from __future__ import annotations

import csv

import pytest

from pipetrain.run.metrics import EpochLosses, MetricsCsv, RateWindow, read_metrics, stage_timings


def test_rate_is_over_the_recent_window_not_since_the_start():
    rate = RateWindow(window_s=5.0)
    for step in range(1, 11):  # slow: 1 step/s
        rate.add(float(step), step)
    for i in range(1, 101):  # then fast: 10 steps/s
        rate.add(10.0 + i / 10, 10 + i)
    assert rate.steps_per_s() == pytest.approx(10.0)


def test_a_pause_is_cut_out_of_the_rate():
    rate = RateWindow(window_s=60.0)
    rate.add(0.0, 1)
    rate.add(1.0, 2)
    rate.pause(1.0)
    rate.resume(101.0)  # 100 s paused
    rate.add(102.0, 3)
    assert rate.steps_per_s() == pytest.approx(1.0)


def test_a_resumed_run_does_not_read_thousands_of_steps_per_second():
    rate = RateWindow()
    rate.add(50.0, 400)  # the first step after --resume: no rate from one point
    assert rate.steps_per_s() is None
    rate.add(50.5, 401)
    assert rate.steps_per_s() == pytest.approx(2.0)


def test_a_restart_starts_the_window_afresh():
    rate = RateWindow(window_s=60.0)
    for step in range(1, 6):
        rate.add(float(step), step)
    rate.add(30.0, 3)  # replays from step 2 after a 25 s recovery
    assert rate.steps_per_s() is None
    rate.add(30.5, 4)
    assert rate.steps_per_s() == pytest.approx(2.0)


def test_epoch_mean_counts_a_replayed_step_once_with_its_last_loss():
    losses = EpochLosses(steps_per_epoch=4)
    for step, loss in [(1, 4.0), (2, 3.0), (3, 9.0), (3, 2.0), (4, 1.0), (5, 0.5)]:
        losses.add(step, loss)
    assert losses.mean(0) == pytest.approx((4 + 3 + 2 + 1) / 4)
    assert losses.mean(1) == pytest.approx(0.5)
    assert losses.mean(7) != losses.mean(7)  # NaN: nothing of that epoch


def test_epoch_mean_primed_from_an_earlier_launch():
    earlier = [{"event": "step", "step": s, "loss": float(s)} for s in (1, 2)]
    losses = EpochLosses(4).prime(earlier + [{"event": "checkpoint", "step": 2}])
    losses.add(3, 3.0)
    losses.add(4, 4.0)
    assert losses.mean(0) == pytest.approx(2.5)


def test_stage_timings_average_replicas_and_add_the_waits():
    metrics = [
        {"stage": 0, "replica": 0, "compute_s": 1.0, "wait_neighbours_s": 0.5,
         "wait_data_s": 0.25, "allreduce_s": 0.1},
        {"stage": 1, "replica": 0, "compute_s": 2.0, "wait_neighbours_s": 0.0,
         "allreduce_s": 0.0},
        {"stage": 0, "replica": 1, "compute_s": 3.0, "wait_neighbours_s": 0.5,
         "wait_data_s": None, "allreduce_s": 0.3},
    ]
    timings = stage_timings(metrics)
    assert list(timings) == [0, 1]
    assert timings[0] == pytest.approx({"compute_s": 2.0, "wait_s": 0.625, "allreduce_s": 0.2})
    assert timings[1] == pytest.approx({"compute_s": 2.0, "wait_s": 0.0, "allreduce_s": 0.0})


def _events(stages: int, steps: range, t0: float = 0.0) -> list[dict]:
    events = [{"t": t0, "event": "run_start", "command": "train",
               "config": {"batch_size": 10, "stages": stages}}]
    for step in steps:
        events.append({"t": t0 + step, "event": "step", "step": step, "epoch": (step - 1) // 2,
                       "loss": 1.0 / step,
                       "metrics": [{"stage": s, "replica": 0, "compute_s": 0.01 * (s + 1),
                                    "wait_neighbours_s": 0.002, "allreduce_s": 0.0}
                                   for s in range(stages)]})
        if step % 2 == 0:
            events.append({"t": t0 + step, "event": "epoch_end", "epoch": (step - 1) // 2})
            events.append({"t": t0 + step, "event": "evaluate", "epoch": (step - 1) // 2,
                           "step": step, "loss": 0.5, "accuracy": 0.75})
    events.append({"t": t0 + 99, "event": "run_end", "status": "done"})
    return events


def test_metrics_csv_rows_with_eval_columns_and_stage_timings(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = MetricsCsv(path)
    for event in _events(2, range(1, 5)):
        writer(event)
    writer.close()
    rows = read_metrics(path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["samples_per_s"] is None and rows[1]["samples_per_s"] == 10.0
    assert [row["eval_accuracy"] for row in rows] == [None, 0.75, None, 0.75]
    assert rows[0]["stage1_compute_s"] == 0.02 and rows[0]["stage0_wait_s"] == 0.002


def test_metrics_csv_resumed_on_more_stages_rewrites_a_wider_header(tmp_path):
    path = tmp_path / "metrics.csv"
    writer = MetricsCsv(path)
    for event in _events(1, range(1, 3))[:-1]:
        writer(event)
    writer.close()
    writer = MetricsCsv(path)
    for event in _events(3, range(3, 5), t0=10.0):
        writer(event)
    writer.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert rows[0]["stage0_compute_s"] == "0.01" and rows[0]["stage2_compute_s"] == ""
    assert rows[3]["stage2_compute_s"] == "0.03"
