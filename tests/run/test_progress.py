"""pipetrain.run.progress: the terminal's view of a run, from its events. Plain lines off a
terminal; on one, a bar that rich clears and redraws, with the other lines above it."""

from __future__ import annotations

import io
import re

from pipetrain.run.progress import Progress, duration

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def events(run_dir, *, pause: bool = True) -> list[dict]:
    config = {"epochs": 2, "batch_size": 8, "stages": 2, "replicas": 1}
    out = [{"t": 0.0, "event": "run_start", "command": "train", "total_steps": 4,
            "from_step": 0, "config": config}]
    for step in range(1, 5):
        t = step * 0.1 + (5.0 if step > 2 and pause else 0.0)  # after the pause
        out.append({"t": t, "event": "step", "step": step, "epoch": (step - 1) // 2,
                    "loss": 2.0 / step})
        if step == 2:
            out += [{"t": 0.2, "event": "epoch_end", "epoch": 0, "step": 2, "loss": 1.0,
                     "mean_loss": 1.5},
                    {"t": 0.2, "event": "evaluate", "epoch": 0, "step": 2, "loss": 1.25,
                     "accuracy": 0.5},
                    {"t": 0.2, "event": "checkpoint", "step": 2, "epoch": 1,
                     "path": "checkpoints/step-00000002"}]
            if pause:
                out += [{"t": 0.25, "event": "paused", "step": 2},
                        {"t": 5.25, "event": "resumed", "step": 2}]
    out += [{"t": 5.5, "event": "epoch_end", "epoch": 1, "step": 4, "loss": 0.5,
             "mean_loss": 0.6},
            {"t": 5.5, "event": "evaluate", "epoch": 1, "step": 4, "loss": 0.75,
             "accuracy": 0.875},
            {"t": 5.6, "event": "run_end", "status": "done", "step": 4}]
    return out


def test_plain_lines_off_a_terminal(tmp_path):
    (tmp_path / "final.npz").write_bytes(b"")
    stream = io.StringIO()
    progress = Progress(tmp_path, stream=stream)
    for event in events(tmp_path):
        progress(event)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train: 4 steps (2 epochs of 2), 2 stage(s) x 1 replica(s)"
    assert "epoch 1/2  train loss 1.5000  held-out loss 1.2500  accuracy 0.5000" in lines
    assert f"checkpoint at step 2: {tmp_path}/checkpoints/step-00000002" in lines
    assert any(line.startswith("paused at step 2") for line in lines)
    assert "resumed at step 2 after 5.0 s paused" in lines
    assert "epoch 2/2  train loss 0.6000  held-out loss 0.7500  accuracy 0.8750" in lines
    summary = lines[-1]
    assert summary.startswith("done in ")
    assert "held-out loss 0.7500, accuracy 0.8750 (best 0.8750 at epoch 2)" in summary
    assert f"parameters: {tmp_path}/final.npz" in summary
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_a_stop_says_how_to_resume_and_a_restart_what_it_cost(tmp_path):
    stream = io.StringIO()
    progress = Progress(tmp_path, stream=stream)
    for event in events(tmp_path, pause=False)[:5]:
        progress(event)
    progress({"t": 0.6, "event": "step", "step": 3, "epoch": 1, "loss": 0.7})
    progress({"t": 1.6, "event": "step", "step": 3, "epoch": 1, "loss": 0.7})
    progress({"t": 1.6, "event": "evaluate", "epoch": 0, "step": 2, "loss": 1.25,
              "accuracy": 0.5})  # epoch 1 evaluated again after a restart
    progress({"t": 1.6, "event": "restart", "from_step": 2, "restart": 1, "recovery_s": 0.31,
              "cause": "stage 1 exited"})
    progress({"t": 1.7, "event": "stop", "step": 3, "reason": "signal"})
    progress({"t": 1.8, "event": "run_end", "status": "stopped", "step": 3})
    text = stream.getvalue()
    assert "restarted from step 2 (restart 1): 1 step(s) lost, recovered in 0.31 s" in text
    assert "accuracy 0.5000  (run again after the restart)" in text
    assert (f"stopped at step 3 (on request); continue with: pipetrain train --resume "
            f"--run-dir {tmp_path}") in text
    assert text.splitlines()[-1].startswith("stopped in ")


def test_quiet_prints_nothing(tmp_path):
    stream = Terminal()
    progress = Progress(tmp_path, stream=stream, quiet=True)
    for event in events(tmp_path):
        progress(event)
    progress.message("anything")
    assert stream.getvalue() == ""


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_lines_go_above_it(tmp_path):
    stream = Terminal()
    progress = Progress(tmp_path, stream=stream)
    assert progress.live
    for event in events(tmp_path):
        progress(event)
    raw = stream.getvalue()
    assert "\x1b[2K" in raw  # rich erases the bar's line before each redraw
    text = ANSI.sub("", raw)
    assert "samples/s" in text and "ETA" in text and "elapsed" in text
    # Every event line begins a line of its own: nothing glued onto the bar.
    for line in ("epoch 1/2  train loss 1.5000", "checkpoint at step 2", "resumed at step 2"):
        index = text.index(line)
        assert text[index - 1] in "\n\r", repr(text[index - 20:index + 20])
    assert text.rstrip().splitlines()[-1].startswith("done in ")


def test_durations():
    assert [duration(s) for s in (0, 7.4, 63, 3723, None, float("nan"))] == [
        "0:00", "0:07", "1:03", "1:02:03", "-:--", "-:--"]
