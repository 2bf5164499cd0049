"""pipetrain.runtime.recovery.plan: the step everyone continues from, and where each replaced
worker's state comes from (pure: no processes)."""

from __future__ import annotations

import pytest

from pipetrain.runtime.recovery import RecoveryImpossible, Report, plan
from pipetrain.runtime.topology import Grid, Position

P = Position


def test_r1_the_failed_worker_continues_from_its_newest_snapshot():
    # Step 40 committed and reported; stage 1 died with snapshots up to 40.
    reports = {P(0, 0): Report(41, (39, 40, 41)), P(2, 0): Report(40, (38, 39, 40))}
    result = plan(Grid(3, 1), {P(1, 0)}, reports, {P(1, 0): (38, 39, 40)}, emitted=40)
    assert result.step == 40 and result.sources == {P(1, 0): "snapshot"}


def test_r1_a_snapshot_one_step_short_costs_one_step_and_survivors_roll_back():
    # Killed while copying step 40: its region has 38 and 39; stage 0 already finished 41.
    reports = {P(0, 0): Report(41, (39, 40, 41)), P(2, 0): Report(40, (38, 39, 40))}
    result = plan(Grid(3, 1), {P(1, 0)}, reports, {P(1, 0): (38, 39)}, emitted=40)
    assert result.step == 39


def test_never_past_the_last_reported_step():
    # Everyone finished 41 but its digests were not all in: 41 is not reported, so not kept.
    reports = {P(0, 0): Report(41, (39, 40, 41)), P(2, 0): Report(41, (39, 40, 41))}
    result = plan(Grid(3, 1), {P(1, 0)}, reports, {P(1, 0): (39, 40, 41)}, emitted=40)
    assert result.step == 40


def test_r2_a_peer_replica_gives_the_state_and_no_step_is_lost():
    reports = {P(0, 0): Report(21, (19, 20, 21)), P(0, 1): Report(20, (18, 19, 20)),
               P(1, 0): Report(20, (18, 19, 20))}
    result = plan(Grid(2, 2), {P(1, 1)}, reports, {P(1, 1): (18, 19)}, emitted=20)
    assert result.step == 20
    assert result.sources == {P(1, 1): "peer"} and result.roots == {1: 0}


def test_a_worker_and_the_holder_of_its_snapshot_both_gone_is_impossible():
    reports = {P(0, 0): Report(30, (28, 29, 30))}
    with pytest.raises(RecoveryImpossible, match="stage 1"):
        plan(Grid(3, 1), {P(1, 0), P(2, 0)}, reports, {P(2, 0): (29, 30)}, emitted=30)


def test_no_common_step_is_impossible():
    reports = {P(0, 0): Report(30, (28, 29, 30))}
    with pytest.raises(RecoveryImpossible, match="no step"):
        plan(Grid(2, 1), {P(1, 0)}, reports, {P(1, 0): (25, 26)}, emitted=30)


def test_every_replica_of_a_stage_lost_takes_its_snapshots():
    reports = {P(0, 0): Report(12, (10, 11, 12)), P(0, 1): Report(12, (10, 11, 12))}
    regions = {P(1, 0): (10, 11, 12), P(1, 1): (10, 11)}
    result = plan(Grid(2, 2), {P(1, 0), P(1, 1)}, reports, regions, emitted=12)
    assert result.step == 11
    assert result.sources == {P(1, 0): "snapshot", P(1, 1): "snapshot"}
    assert result.roots == {1: 0}
