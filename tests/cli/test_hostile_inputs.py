"""Hostile datasets and configs, generated with faker: every one is refused with exit 2 and one
line naming the problem, never a traceback, and nothing is left running."""

from __future__ import annotations

import random

import pytest

from tests.helpers import run_cli

faker = pytest.importorskip("faker")

HEADER = ",".join(f"f{i}" for i in range(64)) + ",label"


def assert_refused(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def hostile_cell(fake, rng: random.Random) -> str:
    return rng.choice([
        fake.word(), fake.emoji(), fake.pystr(min_chars=1, max_chars=30), "nan", "-inf",
        "1e999", "", " ", "0x1F", fake.date(), "\u202e12", "１２",
    ])


@pytest.mark.parametrize("seed", range(6))
def test_hostile_csv_cells_are_refused_with_file_and_line(tmp_path, seed):
    fake = faker.Faker()
    fake.seed_instance(seed)
    rng = random.Random(seed)
    rows = [",".join(str(rng.random()) for _ in range(64)) + f",{rng.randrange(10)}"
            for _ in range(30)]
    bad_row = rng.randrange(len(rows))
    cells = rows[bad_row].split(",")
    cells[rng.randrange(64)] = hostile_cell(fake, rng).replace(",", ";").replace("\n", " ")
    rows[bad_row] = ",".join(cells)
    path = tmp_path / f"hostile-{seed}.csv"
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    result = run_cli("reference", "--dataset", str(path), "--run-dir", str(tmp_path / "run"),
                     "--epochs", "1", "--batch-size", "8", "--quiet", timeout=60)
    assert_refused(result, str(path), f":{bad_row + 2}:")


@pytest.mark.parametrize("seed", range(6))
def test_hostile_config_values_are_refused_naming_the_key(tmp_path, seed):
    fake = faker.Faker()
    fake.seed_instance(seed)
    rng = random.Random(seed)
    key = rng.choice(["stages", "epochs", "batch_size", "lr", "microbatches", "schedule",
                      "optimizer", "dtype", "holdout", "heartbeat_timeout"])
    value = rng.choice([
        f'"{fake.word()}"', f'"{fake.emoji()}"', "-1", "0", "1e308", "true",
        f"[{rng.randint(-5, 5)}]", '""', str(-rng.randint(1, 10**9)),
    ])
    config = tmp_path / "hostile.toml"
    config.write_text(f"{key} = {value}\n", encoding="utf-8")
    result = run_cli("train", str(config), "--run-dir", str(tmp_path / "run"), "--quiet",
                     timeout=60)
    if result.returncode == 0:  # a value that happens to be valid (e.g. lr = 1e308 is not)
        pytest.fail(f"{key} = {value} was accepted")
    assert_refused(result, key)


@pytest.mark.parametrize("seed", range(3))
def test_unknown_keys_with_odd_unicode_names_are_refused(tmp_path, seed):
    fake = faker.Faker(["ja_JP", "ar_AA", "en_US"])
    fake.seed_instance(seed)
    key = f"k_{fake.word()}".replace('"', "")
    config = tmp_path / "hostile.toml"
    config.write_text(f'"{key}" = 1\n', encoding="utf-8")
    result = run_cli("train", str(config), "--run-dir", str(tmp_path / "run"), "--quiet",
                     timeout=60)
    assert_refused(result, "unknown key")
