"""pipetrain_harness.scenario: loading, validation (file and key in one line), the TOML writer."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import ClassVar

import pytest

import pipetrain_harness.faults
from pipetrain.config import TrainConfig
from pipetrain_harness.faults.base import Fault
from pipetrain_harness.scenario import (
    Expect,
    ScenarioError,
    load_all,
    load_scenario,
    scenario_to_toml,
)

VALID = """
name = "kill-a-worker"
description = "one worker is killed; the run restarts and stays bitwise equal"
seed = 7
step_delay_s = 0.02
timeout_s = 60

[train]
layers = [64, 32, 10]
stages = 2
epochs = 2
batch_size = 32
checkpoint_every = 4

[[faults]]
kind = "noop"
at_step = 3
target = "stage:1"

[[faults]]
kind = "noop"
after_checkpoint = 1
duration_s = 0.5

[expect]
equivalence = "bitwise"
restarts = 1
max_rss_mb = 400
exit_status = 0
"""


class NoopFault(Fault):
    """A stand-in kind, so these tests do not depend on the real fault modules."""

    kind = "noop"
    params: ClassVar[dict] = {"target": str, "strength": int}
    point_keys: ClassVar[dict] = {"at_step": int, "after_checkpoint": int}

    def invoke(self, ctx, landing) -> None:
        pass


@pytest.fixture
def fake_faults(monkeypatch):
    monkeypatch.setattr(pipetrain_harness.faults, "FAULTS", {"noop": NoopFault})


def write(tmp_path: Path, text: str, name: str = "case.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str, *words: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "\n" not in message, "scenario errors are one line"
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


def test_valid_file_loads(tmp_path, fake_faults):
    scenario = load_scenario(write(tmp_path, VALID))
    assert scenario.name == "kill-a-worker"
    assert scenario.seed == 7
    assert scenario.step_delay_s == 0.02
    assert scenario.timeout_s == 60.0
    assert scenario.resume_after_stop is False
    assert scenario.train["stages"] == 2
    assert [f.kind for f in scenario.faults] == ["noop", "noop"]
    assert scenario.faults[0].table["at_step"] == 3 and scenario.faults[1].duration_s == 0.5
    assert scenario.expect == Expect(restarts=1, max_rss_mb=400.0)
    config = scenario.train_config()
    assert isinstance(config, TrainConfig)
    assert config.layers == (64, 32, 10) and config.run_dir is None


def test_defaults(tmp_path, fake_faults):
    scenario = load_scenario(write(tmp_path, 'name = "a"\ndescription = "b"\n'))
    assert scenario.seed == 0 and scenario.step_delay_s == 0 and scenario.timeout_s == 300
    assert scenario.train == {} and scenario.faults == []
    expect = scenario.expect
    assert expect.equivalence == "bitwise" and expect.no_leaks is True
    assert expect.exit_status == 0 and expect.state is None and expect.restarts is None


@pytest.mark.parametrize(("old", "new", "words"), [
    ('name = "kill-a-worker"\n', "", ("name", "required")),
    ('name = "kill-a-worker"', 'name = "Kill_A"', ("name", "'Kill_A'")),
    ('name = "kill-a-worker"', "name = 3", ("name", "string")),
    ('description = "one', 'colour = "red"\ndescription = "one', ("colour", "unknown key")),
    ("restarts = 1", "restarts = 1\nretries = 2", ("expect.retries", "unknown key")),
    ('equivalence = "bitwise"', 'equivalence = "close"', ("expect.equivalence", "'close'")),
    ('equivalence = "bitwise"', 'equivalence = "bitwise"\ntolerance = 1e-9',
     ("expect.tolerance", "only allowed")),
    ('equivalence = "bitwise"', 'equivalence = "tolerance"', ("expect.tolerance", "required")),
    ("restarts = 1", "restarts = -1", ("expect.restarts", ">= 0")),
    ("restarts = 1", 'error_matches = "("', ("expect.error_matches", "regular expression")),
    ("stages = 2", "stages = 2\nlearning_rate = 0.1", ("train", "'learning_rate'")),
    ("stages = 2", 'stages = 2\nrun_dir = "/tmp/x"', ("train.run_dir", "not allowed")),
    ("stages = 2", "stages = 5", ("train", "stages")),
    ("step_delay_s = 0.02", "step_delay_s = -1.0", ("step_delay_s", "[0, 60]")),
    ("seed = 7", "seed = true", ("seed", "integer")),
    ("timeout_s = 60", "timeout_s = 0", ("timeout_s",)),
    ('kind = "noop"\nat_step = 3', 'kind = "laser"\nat_step = 3',
     ("faults[0]", "unknown fault kind 'laser'")),
    ('target = "stage:1"', 'target = "stage:1"\nstrength = "high"',
     ("faults[0]", "strength")),
    ("duration_s = 0.5", "duration_s = 0.5\nwhen = 3", ("faults[1]", "'when'")),
    ('kind = "noop"\nafter_checkpoint', "after_checkpoint", ("faults[1]", "kind")),
])
def test_bad_cases_name_file_and_key(tmp_path, fake_faults, old, new, words):
    refused(tmp_path, replace(old, new), *words)


def test_not_toml_and_missing_file(tmp_path):
    refused(tmp_path, "name = \n", "not valid TOML")
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "absent.toml")


def test_faults_must_be_tables(tmp_path, fake_faults):
    refused(tmp_path, 'name = "a"\ndescription = "b"\nfaults = [1, 2]\n', "faults",
            "array of tables")


def test_load_all_sorted_by_file_name(tmp_path, fake_faults):
    for file_name, name in (("b.toml", "second"), ("a.toml", "first"), ("c.toml", "third")):
        write(tmp_path, f'name = "{name}"\ndescription = "x"\n', file_name)
    (tmp_path / "notes.txt").write_text("not a scenario")
    assert [s.name for s in load_all(tmp_path)] == ["first", "second", "third"]


def test_scenario_to_toml_round_trips():
    plan = {
        "name": "fuzz-1-2", "description": 'quotes " and \\ and\nnewline\tand \x7f ünïcode',
        "seed": 3, "step_delay_s": 0.01, "timeout_s": 120, "resume_after_stop": False,
        "train": {"layers": [64, 32, 10], "lr": 1e-3, "schedule": "zb", "augment": True},
        "faults": [
            {"kind": "signal_storm", "signals": ["SIGUSR1", "SIGTSTP"], "rate_per_s": 2000.0},
            {"kind": "kill", "target": "stage:0:replica:1", "at_step": 4},
        ],
        "expect": {"equivalence": "tolerance", "tolerance": 1e-12, "no_leaks": True,
                   "nested": {"deeper": {"x": [[1, 2], [3]]}}},
        "weird key": -0.5,
    }
    text = scenario_to_toml(plan)
    assert tomllib.loads(text) == plan


def test_scenario_to_toml_refuses_what_it_cannot_write():
    with pytest.raises(TypeError):
        scenario_to_toml({"x": None})
    with pytest.raises(TypeError):
        scenario_to_toml({"x": [1, {"a": 1}]})


def test_loaded_scenario_writes_back_to_itself(tmp_path, fake_faults):
    scenario = load_scenario(write(tmp_path, VALID))
    again = load_scenario(write(tmp_path, scenario_to_toml(scenario.to_dict()), "again.toml"))
    assert again.to_dict() == scenario.to_dict()


def _registry_complete() -> bool:
    if importlib.util.find_spec("pipetrain_harness.faults.kill") is None:
        return False
    try:
        pipetrain_harness.faults._register()
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _registry_complete(), reason="the fault kind modules are not all there")
def test_real_registry(tmp_path):
    text = 'name = "a"\ndescription = "b"\n[[faults]]\nkind = "kill"\nat_step = 2\n'
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.faults[0].kind == "kill"
    refused(tmp_path, text.replace('"kill"', '"laser"'), "faults[0]", "unknown fault kind")


@pytest.mark.skipif(not _registry_complete(), reason="the fault kind modules are not all there")
@pytest.mark.parametrize(("faults", "words"), [
    ('kind = "kill"\ntarget = "stage:3"', ("faults[0]", "the run has 3 stage(s)")),
    ('kind = "kill"\ntarget = "stage:1"\nat_step = 2\nat_action = "W0"',
     ("faults[0]", "not an action of stage 1", "F0 F1 B0 B1")),
    ('kind = "kill"\ntarget = "stage:1"\nat_step = 2\nat_reduce = 1',
     ("faults[0]", "replicas >= 2")),
    ('kind = "sever"\nlink = "2->3"', ("faults[0]", "the run has 3 stage(s)")),
    ('kind = "kill"\ntarget = "stage:0"\nat_step = 4\n\n[[faults]]\nkind = "corrupt"\n'
     'link = "1->2"\nat_step = 4', ("faults[1]", "same moment", "faults[0]")),
])
def test_points_the_run_cannot_reach_or_that_race_are_refused(tmp_path, faults, words):
    text = (f'name = "a"\ndescription = "b"\n[train]\nstages = 3\nschedule = "1f1b"\n'
            f'microbatches = 2\n\n[[faults]]\n{faults}\n')
    refused(tmp_path, text, *words)
