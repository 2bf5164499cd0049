"""pipetrain.run.checkpoint without processes: the round trip, any split, every kind of damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipetrain.run import checkpoint
from pipetrain.run.checkpoint import CheckpointError

CONFIG = {"lr": 0.05, "seed": 0, "layers": [4, 3, 2, 2], "dtype": "float64"}
CONFIG_DIGEST = "d" * 64

# Two segments, as a 2-stage run of three layers would write them.
SEGMENTS = (("layers.0.weight", "layers.0.bias"),
            ("layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias"))
SHAPES = {"layers.0.weight": (4, 3), "layers.0.bias": (3,), "layers.1.weight": (3, 2),
          "layers.1.bias": (2,), "layers.2.weight": (2, 2), "layers.2.bias": (2,)}


def make_state(step: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Parameters and momentum state with awkward values: negative zero, subnormals, extremes."""
    rng = np.random.default_rng(step)
    params, optim = {}, {}
    for name, shape in SHAPES.items():
        value = rng.standard_normal(shape)
        value.reshape(-1)[0] = -0.0
        value.reshape(-1)[-1] = np.nextafter(0.0, 1.0)
        params[name] = value
        optim[f"{name}.velocity"] = rng.standard_normal(shape).astype(np.float64)
    return params, optim


def write_checkpoint(checkpoints: Path, step: int, *, commit: bool = True,
                     config: dict | None = None) -> tuple[Path, dict, dict]:
    params, optim = make_state(step)
    tmp = checkpoint.begin(checkpoints, step)
    files = {}
    for index, names in enumerate(SEGMENTS):
        segment_optim = {f"{n}.velocity": optim[f"{n}.velocity"] for n in names}
        segment_optim["step_count"] = np.array(step, dtype=np.int64)
        name, sha = checkpoint.write_segment(tmp, index, {n: params[n] for n in names},
                                             segment_optim)
        files[name] = sha
    if not commit:
        return tmp, params, optim
    path = checkpoint.commit(tmp, step=step, epoch=step // 10, files=files,
                             config=config or CONFIG, config_digest=CONFIG_DIGEST)
    return path, params, optim


def assert_same_bits(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.dtype == expected.dtype, name
    assert actual.shape == expected.shape, name
    assert actual.tobytes() == expected.tobytes(), f"{name} differs"


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoints"
    path.mkdir()
    return path


# -- the round trip ----------------------------------------------------------------------------


def test_commit_then_verify_and_load_bitwise(checkpoints):
    path, params, optim = write_checkpoint(checkpoints, 20)
    assert path == checkpoints / "step-00000020"
    assert sorted(os.listdir(checkpoints)) == ["step-00000020"], "the temporary is renamed away"
    manifest = checkpoint.verify(path)
    assert (manifest.step, manifest.epoch) == (20, 2)
    assert sorted(manifest.files) == ["segment-0.npz", "segment-1.npz"]
    assert manifest.config == CONFIG and manifest.config_digest == CONFIG_DIGEST
    raw = json.loads((path / checkpoint.MANIFEST).read_text())
    assert raw["data_position"] == {"step": 20}

    loaded_params, loaded_optim = checkpoint.load_state(manifest, list(SHAPES))
    assert sorted(loaded_params) == sorted(params)
    for name in params:
        assert_same_bits(loaded_params[name], params[name], name)
    assert sorted(loaded_optim) == sorted([*optim, "step_count"])
    for name in optim:
        assert_same_bits(loaded_optim[name], optim[name], name)
    assert int(loaded_optim["step_count"]) == 20


def test_load_state_with_a_different_split(checkpoints):
    """Stage boundaries need not match the writer's: names are global."""
    path, params, optim = write_checkpoint(checkpoints, 7)
    manifest = checkpoint.verify(path)
    wanted = ["layers.0.bias", "layers.1.weight"]  # one name from each segment file
    loaded_params, loaded_optim = checkpoint.load_state(manifest, wanted)
    assert sorted(loaded_params) == sorted(wanted)
    assert sorted(loaded_optim) == sorted([f"{n}.velocity" for n in wanted] + ["step_count"])
    for name in wanted:
        assert_same_bits(loaded_params[name], params[name], name)
        assert_same_bits(loaded_optim[f"{name}.velocity"], optim[f"{name}.velocity"], name)


def test_load_state_names_a_missing_parameter(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 7)
    with pytest.raises(CheckpointError, match=r"layers\.9\.weight"):
        checkpoint.load_state(checkpoint.verify(path), ["layers.0.weight", "layers.9.weight"])


def test_commit_of_the_same_step_replaces_it(checkpoints):
    write_checkpoint(checkpoints, 5)
    path, params, _ = write_checkpoint(checkpoints, 5, config={**CONFIG, "seed": 1})
    manifest = checkpoint.verify(path)
    assert manifest.config["seed"] == 1
    assert sorted(os.listdir(checkpoints)) == ["step-00000005"]


# -- damage ------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    position = len(data) // 2 if offset is None else offset
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_manifest(path: Path, **changes) -> None:
    manifest_path = path / checkpoint.MANIFEST
    data = json.loads(manifest_path.read_text())
    data.update(changes)
    manifest_path.write_text(json.dumps(data))


def test_flipped_byte_in_a_segment_is_refused(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 10)
    flip_byte(path / "segment-1.npz")
    with pytest.raises(CheckpointError, match=r"segment-1\.npz: sha256 .* does not match") as info:
        checkpoint.verify(path)
    assert str(path) in str(info.value)


def test_truncated_segment_is_refused(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 10)
    segment = path / "segment-0.npz"
    segment.write_bytes(segment.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"segment-0\.npz: .*truncated"):
        checkpoint.verify(path)


def test_missing_manifest_is_refused(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 10)
    (path / checkpoint.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"step-00000010: no manifest\.json"):
        checkpoint.verify(path)


def test_manifest_naming_a_missing_file_is_refused(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 10)
    (path / "segment-1.npz").unlink()
    with pytest.raises(CheckpointError, match=r"segment-1\.npz named in the manifest is missing"):
        checkpoint.verify(path)


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b"[]", b"null",
                                     b'{"step": 1}', b'{"step": "x", "epoch": 0, "files": {}}'])
def test_unreadable_manifest_is_refused(checkpoints, content):
    path, _, _ = write_checkpoint(checkpoints, 10)
    (path / checkpoint.MANIFEST).write_bytes(content)
    with pytest.raises(CheckpointError, match=r"manifest\.json: unreadable manifest"):
        checkpoint.verify(path)


def test_manifest_listing_no_files_is_refused(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 10)
    rewrite_manifest(path, files={})
    with pytest.raises(CheckpointError, match="lists no segment files"):
        checkpoint.verify(path)


@pytest.mark.parametrize("name", ["../x", "sub/x", "/tmp/x"])
def test_manifest_file_name_leaving_the_directory_is_refused(checkpoints, name):
    path, _, _ = write_checkpoint(checkpoints, 10)
    sha = "0" * 64
    if not name.startswith("/"):
        # A real file with the right digest where the name points: refused for the name alone.
        target = path / name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(b"payload")
        sha = checkpoint.file_sha256(target)
    rewrite_manifest(path, files={name: sha})
    with pytest.raises(CheckpointError, match="leaves the directory"):
        checkpoint.verify(path)


# -- choosing a checkpoint, temporaries, pruning -----------------------------------------------


def test_find_intact_skips_a_damaged_newest(checkpoints):
    write_checkpoint(checkpoints, 10)
    newest, _, _ = write_checkpoint(checkpoints, 20)
    flip_byte(newest / "segment-0.npz")
    manifest, refused = checkpoint.find_intact(checkpoints)
    assert manifest is not None and manifest.step == 10
    assert manifest.path == checkpoints / "step-00000010"
    assert len(refused) == 1
    assert "step-00000020" in refused[0] and "does not match" in refused[0]


def test_find_intact_with_nothing_intact(checkpoints, tmp_path):
    only, _, _ = write_checkpoint(checkpoints, 10)
    (only / checkpoint.MANIFEST).unlink()
    manifest, refused = checkpoint.find_intact(checkpoints)
    assert manifest is None and len(refused) == 1
    assert checkpoint.find_intact(tmp_path / "absent") == (None, [])


def test_uncommitted_temporary_is_ignored_and_removed(checkpoints):
    write_checkpoint(checkpoints, 10)
    tmp, _, _ = write_checkpoint(checkpoints, 20, commit=False)
    assert tmp.name.startswith(".step-00000020.tmp-") and tmp.is_dir()
    # a crash mid-write of another one: a partial file
    stale = checkpoints / ".step-00000030.tmp-123"
    stale.mkdir()
    (stale / "segment-0.npz").write_bytes(b"PK\x03\x04partial")
    manifest, refused = checkpoint.find_intact(checkpoints)
    assert manifest is not None and manifest.step == 10 and refused == []
    checkpoint.remove_stale_temporaries(checkpoints)
    assert sorted(os.listdir(checkpoints)) == ["step-00000010"]
    assert checkpoint.verify(checkpoints / "step-00000010").step == 10


def test_prune_keeps_the_newest(checkpoints):
    for step in (3, 10, 25, 100, 2000):
        write_checkpoint(checkpoints, step)
    checkpoint.prune(checkpoints, 2)
    assert sorted(os.listdir(checkpoints)) == ["step-00000100", "step-00002000"]
    checkpoint.prune(checkpoints, 5)
    assert sorted(os.listdir(checkpoints)) == ["step-00000100", "step-00002000"]
    checkpoint.prune(checkpoints, 1)
    assert sorted(os.listdir(checkpoints)) == ["step-00002000"]
    assert checkpoint.verify(checkpoints / "step-00002000").step == 2000


def test_config_differences_names_the_keys(checkpoints):
    path, _, _ = write_checkpoint(checkpoints, 10)
    manifest = checkpoint.verify(path)
    assert checkpoint.config_differences(manifest, dict(CONFIG)) == []
    changed = {**CONFIG, "lr": 0.1, "layers": [4, 3, 3, 2]}
    assert checkpoint.config_differences(manifest, changed) == ["layers", "lr"]
    missing = {k: v for k, v in CONFIG.items() if k != "dtype"}
    assert checkpoint.config_differences(manifest, {**missing, "optimizer": "adam"}) == [
        "dtype", "optimizer"]
