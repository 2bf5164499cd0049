"""``pipetrain sample RUN_DIR [--prompt TEXT] [--tokens N]``: write with a trained text model.

The run directory says what was trained (``run.json``'s config) and holds the parameters:
``final.npz``, or for a run that stopped early its newest intact checkpoint. The vocabulary is
the text's own (its sorted characters), read from the dataset file as the run read it, so the
command runs where the run ran (or with the file at the same path). Each new character is drawn
from the model's softmax over the last ``context`` characters, divided by ``--temperature``,
from a generator seeded by ``--seed``: the same command writes the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipetrain.config import TrainConfig, build_config
from pipetrain.data.sequences import encode
from pipetrain.data.workload import dataset_of
from pipetrain.nn import build_segment
from pipetrain.run import checkpoint
from pipetrain.status import ExitCode, UserError


class SampleError(UserError):
    """A run directory that cannot be sampled from; one line, exit 2."""


HELP = "write text with a trained text model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pipetrain sample`` (the command line makes the subparser)."""
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    parser.add_argument("--tokens", type=int, default=200, help="characters to write")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature (lower: safer, duller)")
    parser.add_argument("--seed", type=int, default=0)


def load_model(run_dir: Path) -> tuple[TrainConfig, dict[str, np.ndarray]]:
    try:
        state = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SampleError(f"{run_dir}: not a run directory (no run.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise SampleError(f"{run_dir}/run.json: unreadable ({exc})") from None
    recorded = {k: v for k, v in state.get("config", {}).items() if k != "run_dir"}
    config = build_config(recorded, source=f"{run_dir}/run.json")
    names = config.model_spec().parameter_names()
    final = run_dir / "final.npz"
    if final.exists():
        with np.load(final, allow_pickle=False) as archive:
            params = {name: archive[name] for name in archive.files}
    else:
        manifest, _ = checkpoint.find_intact(run_dir / "checkpoints")
        if manifest is None:
            raise SampleError(f"{run_dir}: no final.npz and no intact checkpoint to sample from")
        params = checkpoint.load_state(manifest, names)[0]
    missing = [name for name in names if name not in params]
    if missing:
        raise SampleError(f"{run_dir}: the parameters lack {missing[0]} (not this model's)")
    return config, {name: params[name] for name in names}


def generate(config: TrainConfig, params: dict[str, np.ndarray], prompt: str, tokens: int,
             temperature: float, seed: int) -> str:
    model = config.model_spec()
    dataset = dataset_of(config.data_spec())
    if dataset.vocabulary is None:
        raise SampleError(f"the run trained on {dataset.name}, not a text: nothing to write")
    vocabulary = dataset.vocabulary
    table = params["layers.0.tokens"]
    if len(table) != len(vocabulary):
        raise SampleError(f"{dataset.name} has changed since the run: {len(vocabulary)} "
                          f"characters, the model knows {len(table)}")
    context = model.layers[0].get("context")
    segment = build_segment(model.resolved, params, 0, model.num_layers)
    ids = list(encode(prompt, vocabulary))
    if not ids:
        raise SampleError("--prompt must hold at least one character")
    rng = np.random.default_rng(seed)
    for _ in range(tokens):
        window = np.array(ids[-context:], dtype=np.int64)[None, :]
        logits = segment.forward(-1, window, keep=False)[0, -1].astype(np.float64)
        logits = logits / temperature
        probs = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return "".join(vocabulary[i] for i in ids)


def run_sample(args: argparse.Namespace) -> int:
    if args.tokens < 0 or args.tokens > 1_000_000:
        raise SampleError(f"--tokens must be in 0..1000000, got {args.tokens}")
    if not 0 < args.temperature <= 100:
        raise SampleError(f"--temperature must be in (0, 100], got {args.temperature}")
    config, params = load_model(Path(args.run_dir))
    text = generate(config, params, args.prompt, args.tokens, args.temperature, args.seed)
    sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))
    return ExitCode.OK
