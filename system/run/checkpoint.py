"""Consistent checkpoints: one file per segment plus a manifest of digests, written atomically.

Layout: ``checkpoints/step-NNNNNNNN/{segment-S.npz,...,manifest.json}``. Writing happens in a
hidden temporary directory (``.step-NNNNNNNN.tmp-PID``): every stage writes and fsyncs its own
segment file there in parallel, the coordinator writes and fsyncs the manifest last, fsyncs the
directory, renames it into place and fsyncs ``checkpoints/``. A crash at any instant therefore
leaves either no new checkpoint or a complete one; readers ignore hidden directories.

A segment file holds ``param.<name>`` (parameters) and ``optim.<slot>`` (optimizer state) arrays.
Parameters keep their global names, so a checkpoint can be loaded by any stage split.
The data position is the step: batches are a pure function of (seed, epoch, step), and all
randomness is derived from the seed, so no generator state needs saving.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipetrain.run.rundir import fsync_dir, write_atomic
from pipetrain.run.storage import writing

MANIFEST = "manifest.json"
FORMAT = 1
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted; the message names the directory and the problem."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    step: int
    epoch: int
    files: dict[str, str]  # file name -> sha256
    config: dict[str, Any]  # the keys that decide the numbers
    config_digest: str
    data: dict[str, Any] | None = None  # the dataset file and the sha256 of its content

    def segment_files(self) -> list[Path]:
        return [self.path / name for name in sorted(self.files)]


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_segment(directory: Path, index: int, params: dict[str, np.ndarray],
                  optim_state: dict[str, np.ndarray]) -> tuple[str, str]:
    """Write one stage's segment file, fsynced; returns (file name, sha256)."""
    name = f"segment-{index}.npz"
    arrays = {f"param.{key}": value for key, value in params.items()}
    arrays.update({f"optim.{key}": value for key, value in optim_state.items()})
    path = directory / name
    with writing(path):  # a full disk: one line naming the file (StorageError)
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        return name, file_sha256(path)


def begin(checkpoints: Path, step: int) -> Path:
    tmp = checkpoints / f".{step_dir_name(step)}.tmp-{os.getpid()}"
    with writing(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def abandon(tmp: Path) -> None:
    """Remove a checkpoint that will not be committed (best effort: the next start removes
    any leftover, see :func:`remove_stale_temporaries`)."""
    shutil.rmtree(tmp, ignore_errors=True)


def commit(tmp: Path, *, step: int, epoch: int, files: dict[str, str], config: dict[str, Any],
           config_digest: str, data: dict[str, Any] | None = None,
           on_phase: Callable[[str], None] = lambda phase: None) -> Path:
    """Write the manifest into ``tmp`` and rename it into place; ``on_phase`` is told of each
    phase done (``manifest_written``, ``committed``). ``data``: the dataset's digest."""
    manifest = {"format": FORMAT, "step": step, "epoch": epoch, "data_position": {"step": step},
                "rng": {"derived_from_seed": config.get("seed")}, "config": config,
                "config_digest": config_digest, "data": data, "files": files}
    write_atomic(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    on_phase("manifest_written")
    final = tmp.parent / step_dir_name(step)
    with writing(final):
        if final.exists():  # the same step checkpointed twice (a request at a periodic step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(tmp.parent)
    on_phase("committed")
    return final


def verify(path: Path) -> Manifest:
    """Check the manifest and the sha256 of every file it names; raise CheckpointError if not."""
    manifest_path = path / MANIFEST
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        step, epoch, files = int(data["step"]), int(data["epoch"]), dict(data["files"])
        config, config_digest = dict(data["config"]), str(data["config_digest"])
        data_digest = data.get("data")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not files:
        raise CheckpointError(f"{manifest_path}: lists no segment files")
    for name, expected in files.items():
        file_path = path / name
        if Path(name).name != name:
            raise CheckpointError(f"{manifest_path}: file name {name!r} leaves the directory")
        if not file_path.is_file():
            raise CheckpointError(f"{path}: {name} named in the manifest is missing")
        actual = file_sha256(file_path)
        if actual != expected:
            raise CheckpointError(
                f"{file_path}: sha256 {actual[:12]}... does not match the manifest's "
                f"{expected[:12]}... (damaged or truncated)"
            )
    return Manifest(path, step, epoch, files, config, config_digest, data_digest)


def find_intact(checkpoints: Path) -> tuple[Manifest | None, list[str]]:
    """The newest checkpoint that verifies, and the reasons each newer one was refused."""
    refused: list[str] = []
    candidates = sorted(
        (p for p in checkpoints.iterdir() if p.is_dir() and _NAME.match(p.name)),
        key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True,
    ) if checkpoints.is_dir() else []
    for path in candidates:
        try:
            return verify(path), refused
        except CheckpointError as exc:
            refused.append(str(exc))
    return None, refused


def load_state(manifest: Manifest, names: list[str]) -> tuple[dict[str, np.ndarray],
                                                              dict[str, np.ndarray]]:
    """Parameters ``names`` and their optimizer state, from whichever segment files hold them."""
    params: dict[str, np.ndarray] = {}
    optim: dict[str, np.ndarray] = {}
    wanted = set(names)
    for path in manifest.segment_files():
        try:
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    kind, _, name = key.partition(".")
                    base = name.rsplit(".", 1)[0] if kind == "optim" else name
                    if kind == "param" and name in wanted:
                        params[name] = archive[key]
                    elif kind == "optim" and base in wanted:
                        optim[name] = archive[key]
                    elif kind == "optim" and name == "step_count":
                        optim.setdefault("step_count", archive[key])
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
    missing = sorted(wanted - set(params))
    if missing:
        raise CheckpointError(f"{manifest.path}: no parameter {missing[0]!r}")
    return params, optim


def config_differences(manifest: Manifest, config: dict[str, Any]) -> list[str]:
    """Keys whose values differ between the checkpoint's config and ``config``."""
    return sorted(
        key for key in set(manifest.config) | set(config)
        if manifest.config.get(key) != config.get(key)
    )


def prune(checkpoints: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (by step), remove the older ones."""
    names = sorted((p.name for p in checkpoints.iterdir() if _NAME.match(p.name)),
                   key=lambda name: int(_NAME.match(name).group(1)))
    for name in names[:-keep]:
        shutil.rmtree(checkpoints / name, ignore_errors=True)


def remove_stale_temporaries(checkpoints: Path) -> None:
    for path in checkpoints.glob(".step-*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
