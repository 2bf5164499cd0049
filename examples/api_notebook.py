# %% [markdown]
# # pipetrain from Python
#
# The cells of a notebook, as a script (`python examples/api_notebook.py [RUN_ROOT]`, or open it
# in Jupyter / VS Code, which read the `# %%` markers as cells). It trains the built-in digits
# example across two stage processes, reads the result, checks it against the one-process
# reference, and looks at the metrics.

# %%
import sys
import tempfile
from pathlib import Path

import numpy as np

import pipetrain

root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pipetrain-"))

# %% Train: a dict of config keys, keywords override it (as options override a TOML file).
result = pipetrain.train({"epochs": 3, "stages": 2}, microbatches=2, run_dir=root / "train",
                         quiet=True)
print(f"status {result.status}, {result.step}/{result.total_steps} steps, "
      f"held-out accuracy {result.accuracy:.4f} (best {result.best_accuracy:.4f}), "
      f"held-out loss {result.eval_loss:.4f}")
print(f"final parameters: {result.final_params}")

# %% The parameters, by their global names.
params = result.params()
for name, array in params.items():
    print(f"{name:18} {str(array.shape):12} {array.dtype}")

# %% The same run in one process: bitwise equal, step by step.
check = pipetrain.reference({"epochs": 3}, microbatches=2, run_dir=root / "reference",
                            quiet=True)
same = all(np.array_equal(params[name], array) for name, array in check.params().items())
digests = [e["grad_digest"] for e in result.events() if e["event"] == "step"]
reference_digests = [e["grad_digest"] for e in check.events() if e["event"] == "step"]
print(f"bitwise equal to the reference: {same}; every step's gradient digest equal: "
      f"{digests == reference_digests}")

# %% Metrics: a row per step (metrics.csv), per-stage compute and wait.
rows = result.metrics()
rates = [row["samples_per_s"] for row in rows if row["samples_per_s"] is not None]
compute = [row["stage0_compute_s"] + row["stage1_compute_s"] for row in rows]
print(f"{len(rows)} rows; median samples/s {np.median(rates):,.0f}; "
      f"median compute per step {1000 * np.median(compute):.2f} ms")

# %% A mistake is an exception with a one-line message, before anything starts.
try:
    pipetrain.train({"epochs": 1}, stages=9, run_dir=root / "bad")
except pipetrain.UserError as error:  # ConfigError, DataError
    print(f"refused: {error}")
