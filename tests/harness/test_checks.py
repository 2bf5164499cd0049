"""pipetrain_harness.checks: each checker on hand-built run directories, and the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipetrain.config import build_config
from pipetrain.nn.digest import DIGEST
from pipetrain.run.rundir import save_params
from pipetrain_harness.checks import (
    CheckResult,
    RunOutcome,
    ensure_reference,
    reference_config,
    run_checks,
    verdict,
)
from pipetrain_harness.history import History
from pipetrain_harness.scenario import Expect, Scenario


def digest(step: int, tag: str = "") -> str:
    return f"{step:02d}{tag}".ljust(64, "0")


def params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layers.0.weight": rng.normal(size=(4, 3)), "layers.0.bias": rng.normal(size=3),
            "layers.1.weight": rng.normal(size=(3, 2)), "layers.1.bias": rng.normal(size=2)}


def make_run(path: Path, steps: list[tuple[int, str]], final: dict | None, *,
             state: str = "done", extra: list[dict] | None = None) -> Path:
    path.mkdir(parents=True)
    events = [{"t": 1000.0, "event": "run_start"}]
    events += [{"t": 1000.0 + i, "event": "step", "step": step, "epoch": 0,
                "loss": 2.0 / step, "grad_digest": dig} for i, (step, dig) in enumerate(steps)]
    events += extra or []
    events.append({"t": 2000.0, "event": "run_end", "status": state})
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (path / "run.json").write_text(json.dumps({"state": state}))
    if final is not None:
        save_params(path / "final.npz", final)
    return path


def outcome(tmp_path: Path, run_dir: Path | None = None, *, reference: Path | None = None,
            history_from_run: bool = True, **fields) -> RunOutcome:
    expect = fields.pop("expect", Expect())
    scenario = Scenario(path=Path("case.toml"), name="case", description="d", seed=0,
                        train={}, faults=[], expect=expect)
    if run_dir is None:
        run_dir = tmp_path / "default-run"
        if not run_dir.exists():
            make_run(run_dir, [(1, digest(1))], params())
    history = History()
    if history_from_run:
        history.add_run_events([json.loads(line) for line in
                                (run_dir / "events.jsonl").read_text().splitlines()])
    values = dict(scenario=scenario, run_dir=run_dir, exit_status=0, stderr="", wall_s=10.0,
                  history=history, monitor_samples=[], peak_rss_mb={}, leaks=[], launches=1,
                  reference_dir=reference)
    values.update(fields)
    return RunOutcome(**values)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {result.name: result for result in results}


STEPS = [(s, digest(s)) for s in range(1, 6)]


@pytest.fixture
def reference(tmp_path) -> Path:
    return make_run(tmp_path / "reference", STEPS, params())


def test_exit_status(tmp_path):
    assert by_name(run_checks(outcome(tmp_path, expect=Expect(equivalence="none"))))[
        "exit_status"].status == "valid"
    result = by_name(run_checks(outcome(tmp_path, exit_status=1,
                                        expect=Expect(equivalence="none"))))["exit_status"]
    assert result.status == "invalid" and "exit status 1 (expected 0)" in result.message


def test_error_matches(tmp_path):
    expect = Expect(equivalence="none", exit_status=1, error_matches=r"restarts? exhausted")
    good = outcome(tmp_path, exit_status=1, stderr="pipetrain: run failed: restarts exhausted\n",
                   expect=expect)
    assert by_name(run_checks(good))["error_matches"].status == "valid"
    bad = outcome(tmp_path, exit_status=1, stderr="something else\n", expect=expect)
    result = by_name(run_checks(bad))["error_matches"]
    assert result.status == "invalid" and "something else" in result.message
    # unset: not run at all
    assert "error_matches" not in by_name(run_checks(outcome(tmp_path,
                                                             expect=Expect(equivalence="none"))))


def test_state(tmp_path):
    run_dir = make_run(tmp_path / "run", STEPS, params(), state="stopped")
    results = by_name(run_checks(outcome(tmp_path, run_dir,
                                         expect=Expect(equivalence="none", state="stopped"))))
    assert results["state"].status == "valid"
    results = by_name(run_checks(outcome(tmp_path, run_dir,
                                         expect=Expect(equivalence="none", state="done"))))
    assert results["state"].status == "invalid"
    assert "'stopped'" in results["state"].message


def test_restarts_counted(tmp_path):
    restarts = [{"t": 1500.0, "event": "restart", "from_step": 2},
                {"t": 1600.0, "event": "restart", "from_step": 4}]
    run_dir = make_run(tmp_path / "run", STEPS, params(), extra=restarts)
    good = by_name(run_checks(outcome(tmp_path, run_dir,
                                      expect=Expect(equivalence="none", restarts=2))))
    assert good["restarts"].status == "valid"
    assert good["restarts"].details["from_steps"] == [2, 4]
    bad = by_name(run_checks(outcome(tmp_path, run_dir,
                                     expect=Expect(equivalence="none", restarts=1))))
    assert bad["restarts"].status == "invalid"
    assert "2 restart(s) (expected 1)" in bad["restarts"].message


def test_events_read_from_the_run_dir_when_the_history_has_none(tmp_path):
    run_dir = make_run(tmp_path / "run", STEPS, params(),
                       extra=[{"t": 1500.0, "event": "restart", "from_step": 2}])
    result = by_name(run_checks(outcome(tmp_path, run_dir, history_from_run=False,
                                        expect=Expect(equivalence="none", restarts=1))))
    assert result["restarts"].status == "valid"


def test_equivalence_bitwise_valid(tmp_path, reference):
    run_dir = make_run(tmp_path / "run", STEPS, params())
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference)))["equivalence"]
    assert result.status == "valid", result.message
    assert "5 steps and 4 parameters bitwise equal" in result.message


def test_equivalence_names_first_step_and_parameter(tmp_path, reference):
    steps = [(s, digest(s, "x" if s >= 3 else "")) for s in range(1, 6)]
    final = params()
    final["layers.1.weight"] = final["layers.1.weight"].copy()
    final["layers.1.weight"][1, 1] = np.nextafter(final["layers.1.weight"][1, 1], np.inf)
    final["layers.1.bias"] = final["layers.1.bias"] + 1.0  # later in canonical order
    run_dir = make_run(tmp_path / "run", steps, final)
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference)))["equivalence"]
    assert result.status == "invalid"
    assert "first differing step 3" in result.message
    assert "differ first at layers.1.weight" in result.message
    assert "max abs diff" in result.message
    assert result.details["first_differing_step"]["step"] == 3


def test_equivalence_same_steps_different_parameters(tmp_path, reference):
    final = params()
    final["layers.0.bias"] = final["layers.0.bias"] * 2
    run_dir = make_run(tmp_path / "run", STEPS, final)
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference)))["equivalence"]
    assert result.status == "invalid"
    assert "every step's grad_digest matches" in result.message
    assert "layers.0.bias" in result.message


def test_repeated_steps_after_a_restart_use_the_last_occurrence(tmp_path, reference):
    # Steps 3 and 4 went wrong, the group restarted from step 2 and redid them right.
    steps = [(1, digest(1)), (2, digest(2)), (3, digest(3, "bad")), (4, digest(4, "bad")),
             (3, digest(3)), (4, digest(4)), (5, digest(5))]
    run_dir = make_run(tmp_path / "run", steps, params(),
                       extra=[{"t": 1003.5, "event": "restart", "from_step": 2}])
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference)))["equivalence"]
    assert result.status == "valid", result.message
    # ...and the other way round: right first, wrong on the rerun.
    steps = [(1, digest(1)), (2, digest(2)), (3, digest(3)), (2, digest(2)),
             (3, digest(3, "bad")), (4, digest(4)), (5, digest(5))]
    run_dir = make_run(tmp_path / "run2", steps, params())
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference)))["equivalence"]
    assert result.status == "invalid" and "first differing step 3" in result.message


def test_equivalence_missing_steps_and_final(tmp_path, reference):
    run_dir = make_run(tmp_path / "run", STEPS[:3], None, state="stopped")
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference)))["equivalence"]
    assert result.status == "invalid"
    assert "first differing step 4 (missing from the run)" in result.message
    # the steps it made agree, but there is nothing final to compare: cannot tell
    ref3 = make_run(tmp_path / "ref3", STEPS[:3], params())
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=ref3)))["equivalence"]
    assert result.status == "unknown" and "no final.npz" in result.message


def test_equivalence_tolerance(tmp_path, reference):
    final = {name: value * (1 + 1e-10) for name, value in params().items()}
    steps = [(s, digest(s, "t")) for s in range(1, 6)]
    run_dir = make_run(tmp_path / "run", steps, final)
    close = Expect(equivalence="tolerance", tolerance=1e-8)
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference,
                                        expect=close)))["equivalence"]
    assert result.status == "valid", result.message
    tight = Expect(equivalence="tolerance", tolerance=1e-12)
    result = by_name(run_checks(outcome(tmp_path, run_dir, reference=reference,
                                        expect=tight)))["equivalence"]
    assert result.status == "invalid" and "relative max error" in result.message


def test_equivalence_skipped_when_a_failure_is_expected(tmp_path):
    results = by_name(run_checks(outcome(tmp_path, exit_status=1, reference=None,
                                         expect=Expect(exit_status=1))))
    assert "equivalence" not in results
    assert results["exit_status"].status == "valid"


def test_a_check_that_raises_is_unknown(tmp_path):
    # A reference directory without its events: the checker cannot read it.
    broken = tmp_path / "broken-reference"
    broken.mkdir()
    result = by_name(run_checks(outcome(tmp_path, reference=broken)))["equivalence"]
    assert result.status == "unknown"
    assert "crashed" in result.message and "FileNotFoundError" in result.message

    def explode(_outcome):
        raise ZeroDivisionError("boom")

    results = run_checks(outcome(tmp_path), [("explodes", lambda o: True, explode)])
    assert [(r.name, r.status) for r in results] == [("explodes", "unknown")]
    assert "boom" in results[0].message


def test_no_leaks(tmp_path):
    expect = Expect(equivalence="none")
    assert by_name(run_checks(outcome(tmp_path, expect=expect)))["no_leaks"].status == "valid"
    leaks = ["process left behind: pid 12 (worker) python -m pipetrain.runtime.worker 3 4",
             "fd leak: pid 13 (worker) went from 8 to 58 open fds"]
    result = by_name(run_checks(outcome(tmp_path, leaks=leaks, expect=expect)))["no_leaks"]
    assert result.status == "invalid" and "pid 12" in result.message and "pid 13" in result.message
    off = Expect(equivalence="none", no_leaks=False)
    assert "no_leaks" not in by_name(run_checks(outcome(tmp_path, leaks=leaks, expect=off)))


def test_max_rss_and_max_wall(tmp_path):
    samples = [{"pid": 10, "role": "coordinator"}, {"pid": 11, "role": "worker"}]
    expect = Expect(equivalence="none", max_rss_mb=100.0, max_wall_s=5.0)
    results = by_name(run_checks(outcome(tmp_path, expect=expect, wall_s=7.5,
                                         monitor_samples=samples,
                                         peak_rss_mb={10: 60.0, 11: 140.5})))
    assert results["max_rss_mb"].status == "invalid"
    assert "pid 11 (worker)" in results["max_rss_mb"].message
    assert "140.5" in results["max_rss_mb"].message
    assert results["max_wall_s"].status == "invalid" and "7.5" in results["max_wall_s"].message
    results = by_name(run_checks(outcome(tmp_path, expect=expect, wall_s=4.0,
                                         monitor_samples=samples,
                                         peak_rss_mb={10: 60.0, 11: 99.0})))
    assert results["max_rss_mb"].status == "valid"
    assert results["max_wall_s"].status == "valid"
    # No sample at all: cannot tell.
    results = by_name(run_checks(outcome(tmp_path, expect=expect)))
    assert results["max_rss_mb"].status == "unknown"


def test_verdict():
    def r(status):
        return CheckResult("x", status, "")

    assert verdict([r("valid"), r("valid")]) == "valid"
    assert verdict([]) == "valid"
    assert verdict([r("valid"), r("unknown")]) == "unknown"
    assert verdict([r("unknown"), r("invalid"), r("valid")]) == "invalid"


def test_reference_config_keeps_only_the_math():
    values = reference_config({"stages": 3, "schedule": "zb", "replicas": 2, "epochs": 1,
                               "transport": "pipe", "blas_threads": 2, "batch_size": 16,
                               "layers": [64, 10], "checkpoint_every": 3, "prefetch": 1})
    assert "stages" not in values and "schedule" not in values and "blas_threads" not in values
    assert values["replicas"] == 2 and values["epochs"] == 1 and values["layers"] == [64, 10]


def test_ensure_reference_reuses_the_cache(tmp_path):
    train = {"layers": [64, 10], "epochs": 1, "stages": 1}
    digest_ = build_config({**reference_config(train), "stages": 1}).math_digest()
    cached = make_run(tmp_path / "cache" / f"ref-{DIGEST}-{digest_}", STEPS, params())
    # A different stage count or schedule is the same reference.
    assert ensure_reference({**train, "schedule": "gpipe"}, tmp_path / "cache") == cached


def test_a_reference_hashed_by_another_digest_is_not_reused(tmp_path):
    """A cache filled by a pipetrain whose gradient digests used another hash (sha256 before
    XXH3) would make every scenario invalid: it is not that reference."""
    train = {"layers": [64, 10], "epochs": 1, "batch_size": 256, "holdout": 0.5}
    digest_ = build_config({**reference_config(train), "stages": 1}).math_digest()
    stale = make_run(tmp_path / "cache" / f"ref-{digest_}", STEPS, params())
    fresh = ensure_reference(train, tmp_path / "cache")
    assert fresh != stale and fresh.name == f"ref-{DIGEST}-{digest_}"


def test_ensure_reference_builds_once(tmp_path):
    train = {"layers": [64, 10], "epochs": 1, "batch_size": 256, "holdout": 0.5}
    ref = ensure_reference(train, tmp_path / "cache")
    assert (ref / "final.npz").exists() and (ref / "reference.toml").exists()
    steps = [e for e in map(json.loads, (ref / "events.jsonl").read_text().splitlines())
             if e["event"] == "step"]
    assert steps and all(len(e["grad_digest"]) == 32 for e in steps)  # xxh3_128, hex
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [ref.name]  # no temporaries
    assert ensure_reference(train, tmp_path / "cache") == ref


def test_ensure_reference_failure_is_clear(tmp_path):
    with pytest.raises(RuntimeError, match="reference run failed"):
        ensure_reference({"dataset": str(tmp_path / "absent.csv"), "epochs": 1},
                         tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
