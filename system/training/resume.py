"""Where a resumed run may continue from: the newest intact checkpoint, if it was written with
the same math config and the same data.

Stage count and schedule never change the bits, so they may differ (and so may a larger
``--epochs``: it only adds steps). ``--replicas`` is refused with why: replicas sum their
gradients in replica order over their own shares of each batch. A dataset file whose content
changed since the checkpoint (its sha256 is in the manifest) is refused naming the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipetrain.config import ConfigError, TrainConfig
from pipetrain.run import checkpoint
from pipetrain.run.rundir import RunDir


def dataset_digest(config: TrainConfig) -> dict | None:
    """The dataset file and the sha256 of its content (None for a built-in dataset)."""
    path = Path(config.dataset)
    if not path.is_file():
        return None
    return {"file": config.dataset, "sha256": checkpoint.file_sha256(path)}


def resume_point(run: RunDir, config: TrainConfig,
                 data: dict | None = None) -> checkpoint.Manifest | None:
    """The newest intact checkpoint (damaged ones are reported and skipped), which must have
    been written with the same math config and the same data."""
    manifest, refused = checkpoint.find_intact(run.checkpoints)
    for reason in refused:
        print(f"pipetrain: refusing checkpoint: {reason}", file=sys.stderr)
    if manifest is None:
        return None
    differing = checkpoint.config_differences(manifest, config.math_config())
    if "epochs" in differing and config.epochs >= manifest.config.get("epochs", 0):
        # More epochs only add steps: batches are pure functions of (seed, epoch, step),
        # so the steps done so far are the same either way.
        differing.remove("epochs")
    if "replicas" in differing:
        raise ConfigError(
            f"{manifest.path}: written with --replicas {manifest.config.get('replicas')}, not "
            f"{config.replicas}: replicas sum their gradients in replica order over their own "
            f"shares of each batch, so another count changes the bits; resume with --replicas "
            f"{manifest.config.get('replicas')} or use a new --run-dir")
    if differing:
        raise ConfigError(
            f"{manifest.path}: written with a different config (differing keys: "
            f"{', '.join(differing)}); resume with the same values or use a new --run-dir")
    recorded = manifest.data or {}
    if data and recorded.get("sha256") and recorded["sha256"] != data["sha256"]:
        raise ConfigError(
            f"{config.dataset}: changed since {manifest.path} was written (sha256 "
            f"{recorded['sha256'][:12]}... then, {data['sha256'][:12]}... now): resuming would "
            f"train on other data; restore the file or use a new --run-dir")
    return manifest
