"""``python -P -m pipetrain_harness.entry train|reference ARGS`` or ``... worker FD FD``: a
pipetrain process with the harness's hooks installed from ``PIPETRAIN_HARNESS_PLAN``.

The runner starts the run under test this way; the coordinator's ``worker_command`` hook starts
its workers this way too, and under mpirun every rank comes here. Without a plan in the
environment the hooks do nothing and this is plain ``pipetrain``. With a ``probe_path`` in the
plan the process samples itself first thing and last thing (``pipetrain_harness.probes``).
"""

from __future__ import annotations

import sys

# First, before numpy loads anywhere: the command line fixes the BLAS threads of a coordinator.
from pipetrain import cli, hooks  # isort: skip
from pipetrain.runtime import worker  # isort: skip

from pipetrain_harness import probes
from pipetrain_harness.hooks import HarnessHooks
from pipetrain_harness.plan import Plan


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    plan = Plan.from_env()
    role = "worker" if argv[:1] == ["worker"] else "coordinator"
    probes.take(plan.probe_path, "start", role)
    hooks.install(HarnessHooks(plan))
    try:
        if role == "worker":
            sys.exit(worker.main(argv[1:]))
        cli.main(argv)
    finally:
        probes.take(plan.probe_path, "exit", role)


if __name__ == "__main__":
    main()
