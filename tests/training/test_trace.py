"""``--trace`` over real processes: a Chrome trace of every process and thread that holds every
schedule action, send and receive; ``pipetrain trace`` draws and summarizes it; a traced run is
still bitwise equal to the reference."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from pipetrain.pipeline.schedule import build
from tests.helpers import run_cli

STAGES, MICROBATCHES = 3, 4
BASE = ["--layers", "64,32,32,10", "--epochs", "1", "--batch-size", "64", "--microbatches",
        str(MICROBATCHES), "--quiet"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("traced")
    run_cli("train", "--run-dir", str(run_dir), "--stages", str(STAGES), "--schedule", "zb",
            "--trace", *BASE, check=True)
    return run_dir


def steps(run_dir):
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "step"]


def test_the_trace_holds_every_process_thread_and_action(traced):
    document = json.loads((traced / "trace.json").read_text())
    events = document["traceEvents"]
    assert not (traced / "trace").exists()  # the per-process parts are merged and gone
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(processes.values()) == ["coordinator"] + [
        f"stage {s} replica 0" for s in range(STAGES)]
    threads = defaultdict(set)
    for e in events:
        if e["ph"] == "M" and e["name"] == "thread_name":
            threads[processes[e["pid"]]].add(e["args"]["name"])
    # This model is small: each stage reads its links and the control pipe, hashes its
    # gradients, copies its snapshot and loads its data on its main thread (a step of frames
    # fits in the pipe; INLINE_DIGEST_BYTES, INLINE_SNAPSHOT_BYTES, INLINE_ITEM_BYTES).
    for s in range(STAGES):
        assert threads[f"stage {s} replica 0"] == {"main"}
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["tid"] in {t["tid"] for t in events
                                              if t["ph"] == "M" and t["pid"] == e["pid"]}
               for e in spans)
    total = len(steps(traced))
    plan = build("zb", STAGES, MICROBATCHES)
    by_process = {name: [e for e in spans if e["pid"] == pid] for pid, name in processes.items()}
    pid_of = {int(name.split()[1]): pid for pid, name in processes.items() if name != "coordinator"}
    for s in range(STAGES):
        mine = by_process[f"stage {s} replica 0"]
        actions = Counter((e["args"]["step"], e["name"]) for e in mine if e["cat"] == "compute"
                          and e["name"] != "update")
        # Every action of the schedule, once in every step, and nothing else.
        assert actions == Counter((k, str(a)) for k in range(1, total + 1) for a in plan[s])
        sends = Counter(e["args"]["kind"] for e in mine if e["cat"] == "send")
        receives = Counter(e["args"]["kind"] for e in mine if e["cat"] == "recv")
        forward = 0 if s == STAGES - 1 else total * MICROBATCHES
        backward = 0 if s == 0 else total * MICROBATCHES
        assert sends == Counter({k: v for k, v in (("activation", forward),
                                                   ("gradient", backward)) if v})
        assert receives["control"] >= total
        assert receives["activation"] == backward and receives["gradient"] == forward
        assert Counter(e["cat"] for e in mine)["digest"] == total
        main_tid = next(e["tid"] for e in events if e["ph"] == "M" and e["pid"] == pid_of[s]
                        and e["name"] == "thread_name" and e["args"]["name"] == "main")
        for category in ("digest", "recv", "snapshot"):
            assert {e["tid"] for e in mine if e["cat"] == category} == {main_tid}, category
    # Spans of one thread nest or follow each other (never overlap part-way), as the
    # trace-event viewers need.
    for pid in processes:
        for tid in {e["tid"] for e in by_process[processes[pid]]}:
            ordered = sorted((e for e in spans if e["pid"] == pid and e["tid"] == tid),
                             key=lambda e: (e["ts"], -e["dur"]))
            open_ends: list[float] = []
            for e in ordered:
                while open_ends and open_ends[-1] <= e["ts"] + 1e-3:
                    open_ends.pop()
                assert not open_ends or e["ts"] + e["dur"] <= open_ends[-1] + 1e-3, e
                open_ends.append(e["ts"] + e["dur"])


def test_big_frames_and_states_have_their_threads(tmp_path):
    """A step of 256 rows of 1024 float64s is 2 MiB a link, more than a pipe holds: a receiver
    thread reads each link ahead; the state is big enough for the digest and snapshot threads."""
    run_dir = tmp_path / "big"
    run_cli("train", "--run-dir", str(run_dir), "--stages", "2", "--trace", "--layers",
            "64,1024,1024,10", "--epochs", "1", "--batch-size", "256", "--quiet", check=True)
    events = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e["ph"] == "M" and e["name"] == "process_name"}
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    where = defaultdict(set)  # (process, category of span) -> threads
    for e in events:
        if e["ph"] == "X":
            where[processes[e["pid"]], e["cat"]].add(names[e["pid"], e["tid"]])
    assert where["stage 0 replica 0", "recv"] >= {"recv-downstream"}
    assert where["stage 1 replica 0", "recv"] >= {"recv-upstream"}
    for stage in ("stage 0 replica 0", "stage 1 replica 0"):
        assert "main" in where[stage, "recv"]  # the control pipe is still read on main
        assert where[stage, "digest"] == {"digester"}
        assert where[stage, "snapshot"] == {"snapshot"}


def test_a_traced_run_is_bitwise_the_reference(tmp_path, traced):
    reference = tmp_path / "reference"
    run_cli("reference", "--run-dir", str(reference), *BASE, check=True)
    assert [(e["step"], e["grad_digest"]) for e in steps(traced)] == [
        (e["step"], e["grad_digest"]) for e in steps(reference)]
    assert json.loads((traced / "run.json").read_text())["grad_digest_hash"] == "xxh3_128"


def test_pipetrain_trace_draws_and_summarizes(tmp_path, traced):
    png = tmp_path / "timeline.png"
    result = run_cli("trace", str(traced), "-o", str(png), "--steps", "4-6")
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for words in ("zb, S=3, M=4", "ideal pipeline", "bubble: measured", "stage  compute"):
        assert words in result.stdout
    as_json = run_cli("trace", str(traced), "-o", str(png), "--json")
    summary = json.loads(as_json.stdout)
    assert len(summary["per_stage"]) == STAGES
    assert 0 < summary["ideal_step_s"] <= summary["window_s"]
    assert 0 <= summary["schedule_bubble"] < 1 and 0 <= summary["measured_bubble"] < 1
    for row in summary["per_stage"]:
        assert {"F", "I", "W", "update"} <= set(row["action_s"])


@pytest.mark.parametrize("args,says", [
    ((), "no trace.json (train with --trace"),
    (("--steps", "9-3"), "--steps: expected 1 <= A <= B"),
])
def test_pipetrain_trace_refuses_in_one_line(tmp_path, traced, args, says):
    untraced = tmp_path / "untraced"
    run_cli("reference", "--run-dir", str(untraced), *BASE, check=True)
    target = traced if args else untraced
    result = run_cli("trace", str(target), "-o", str(tmp_path / "x.png"), *args)
    assert result.returncode == 2
    assert says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
