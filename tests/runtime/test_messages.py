"""pipetrain.runtime.messages: every control message round-trips, and nothing else decodes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipetrain.runtime import messages
from pipetrain.wire.frames import Kind, ProtocolError
from tests.wire.whole_frames import decode_frame, encode_frame

QUICK = {"database": None, "deadline": None, "max_examples": 50}

EXAMPLES = [
    messages.Init(config={"stages": 2, "layers": [4, 3]}, stage=1, replica=0, num_stages=2,
                  layers=[1, 2],
                  links={"upstream": {"read": "upstream.read", "write": "upstream.write"}},
                  op_timeout_s=60.0, heartbeat_interval_s=1.0, heartbeat_timeout_s=5.0,
                  generation=2, start_step=40, resume_from="/runs/a/step-00000040",
                  log_path="/runs/a/logs/stage-1.log",
                  fds=["upstream.read", "upstream.write", "region"], state_source="snapshot",
                  state_root=1, snapshots=True),
    messages.Hold(fds=["held:1.0"]), messages.Halt(),
    messages.Restore(step=39, generation=3, links={"downstream": {"rank": 4}}, fds=[],
                     state_root=-1),
    messages.Halted(step=40, snapshots=[38, 39, 40], held={"1.0": [39, 40]},
                    fds=["region", "held:1.0"]),
    messages.Restored(step=39),
    messages.Ready(pid=123, region=True),
    messages.Step(step=7), messages.SendParams(),
    messages.WriteCheckpoint(directory="/x/.step-00000008.tmp-1", step=8), messages.Stop(),
    messages.Ready(pid=123), messages.Heartbeat(),
    messages.StepDone(step=7, loss=0.25, compute_s=0.1, wait_neighbours_s=0.02,
                      allreduce_s=0.0, wait_data_s=0.001, loader_depth=3),
    messages.StepDone(step=7, loss=None, compute_s=0.1, wait_neighbours_s=0.0,
                      allreduce_s=0.0),
    messages.StepDone(step=7, loss=None, compute_s=0.1, wait_neighbours_s=0.0,
                      allreduce_s=0.0, digests=["ab" * 16, None]),
    messages.Digests(step=7, digests=["ab" * 32, None]),
    messages.ParamsFollow(names=["layers.0.weight", "layers.0.bias"]),
    messages.Checkpointed(params_digest="cd" * 32, file="segment-0.npz", sha256="ef" * 32),
    messages.Checkpointed(params_digest="cd" * 32, error="x/segment-0.npz: No space left on "
                          "device (ENOSPC)"),
    messages.Failed(message="stage 1: boom", traceback="Traceback ...", consequence=True),
    messages.Exited(status=0, pid=99),
]


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(messages.MESSAGES.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip_through_a_control_frame(message):
    payload = messages.encode(message)
    assert payload.dtype == np.uint8 and payload.ndim == 1
    frame = decode_frame(encode_frame(Kind.CONTROL, 0, 0, payload))
    assert messages.decode(frame.array) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_the_payload_is_the_json_of_every_field(message):
    """encode reads the fields itself (no ``dataclasses.asdict``): the bytes must be exactly
    the JSON of the whole message, as before."""
    body = {"type": message.TYPE, **dataclasses.asdict(message)}
    expected = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert messages.encode(message).tobytes() == expected


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        messages.Step(step=1).step = 2  # type: ignore[misc]


def test_a_nan_loss_is_reportable():
    done = messages.StepDone(step=1, loss=float("nan"), compute_s=0, wait_neighbours_s=0,
                             allreduce_s=0)
    assert math.isnan(messages.decode(messages.encode(done)).loss)


def test_metrics_leave_out_what_a_stage_does_not_measure():
    done = messages.StepDone(step=1, loss=None, compute_s=0.5, wait_neighbours_s=0.25,
                             allreduce_s=0.0)
    assert done.metrics() == {"compute_s": 0.5, "wait_neighbours_s": 0.25, "allreduce_s": 0.0}


def payload(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


@pytest.mark.parametrize(("text", "match"), [
    ('{"type": "launch"}', "unknown control message"),
    ('{"step": 3}', "unknown control message"),
    ('{"type": "step"}', r"missing fields \['step'\]"),
    ('{"type": "step", "step": 3, "extra": 1}', r"unknown fields \['extra'\]"),
    ("[1, 2]", "not a JSON object"),
    ("{", "not valid JSON"),
])
def test_malformed_messages_are_protocol_errors(text, match):
    with pytest.raises(ProtocolError, match=match):
        messages.decode(payload(text))


@pytest.mark.parametrize(("raw", "match"), [(b"\xff", "not valid UTF-8"),
                                            (b"[" * 100_000, "not valid JSON")])
def test_bad_bytes_are_protocol_errors(raw, match):
    with pytest.raises(ProtocolError, match=match):
        messages.decode(np.frombuffer(raw, dtype=np.uint8))


def test_wrong_arrays_are_refused():
    with pytest.raises(ProtocolError, match="1-d uint8"):
        messages.decode(np.zeros(3, np.float32))
    with pytest.raises(ProtocolError, match="1-d uint8"):
        messages.decode(np.zeros((2, 2), np.uint8))


@given(st.binary(max_size=64))
@settings(**QUICK)
def test_decode_never_raises_anything_else(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        messages.decode(np.frombuffer(raw, dtype=np.uint8))


def test_retired_frame_kinds_are_unknown():
    with pytest.raises(ValueError):
        Kind(5)
    with pytest.raises(ValueError):
        Kind(6)
