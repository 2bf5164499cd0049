"""The Python API: the notebook-style example run as a user would, and a run started off the
main thread (no signal control: it says so and trains anyway)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, cli_env, load_params


def test_the_notebook_example_trains_and_reads_its_result(tmp_path):
    result = subprocess.run(
        [sys.executable, "-P", str(REPO / "examples" / "api_notebook.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=cli_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("status done, 66/66 steps, held-out accuracy 0.")
    assert out[1] == f"final parameters: {tmp_path}/train/final.npz"
    assert "layers.2.weight    (64, 10)     float64" in out
    assert "bitwise equal to the reference: True; every step's gradient digest equal: True" \
        in out
    assert any(line.startswith("66 rows; median samples/s ") for line in out)
    assert out[-1].startswith("refused: config: stages: 9 stages for 3 layers")
    assert not (tmp_path / "bad").exists()
    assert (tmp_path / "train" / "metrics.csv").exists()
    assert load_params(tmp_path / "train").keys() == load_params(tmp_path / "reference").keys()


OFF_MAIN = """
import sys, threading
import pipetrain

results = []
thread = threading.Thread(target=lambda: results.append(
    pipetrain.train(epochs=1, stages=2, run_dir=sys.argv[1])))
thread.start()
thread.join()
print(results[0].status, results[0].step, results[0].final_params is not None)
"""


def test_off_the_main_thread_it_runs_without_signal_control_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, "-P", "-c", OFF_MAIN, str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["done", "22", "True"]
    assert "not on the main thread: running without signal control" in result.stderr
    assert "Traceback" not in result.stderr
