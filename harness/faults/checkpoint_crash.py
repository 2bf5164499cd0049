"""checkpoint_crash: kill a process *while a checkpoint is being written*, to prove the
write-to-a-temporary-name-then-rename contract (the previous checkpoint survives intact).

Waiting for a step and killing soon after would almost never land inside the write, so the
watcher thread polls ``checkpoints/`` every 2 ms for a ``.step-*.tmp-*`` directory and kills
the moment one appears; ``prepare`` widens the window by asking the stages to pause
``checkpoint_delay_s`` in the middle of each write. The watcher gives up after ``duration_s``
(default 30) and records ``no_checkpoint_seen``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from pipetrain_harness.faults._settings import setting
from pipetrain_harness.faults._signals import OwnedThread, check_target, parse_signal, resolve, send
from pipetrain_harness.faults.base import Context, Fault, Launch

POLL_S = 0.002


class CheckpointCrash(Fault):
    kind = "checkpoint_crash"
    params = {"target": str, "signal": str, "checkpoint_delay_s": (int, float)}

    def __init__(self, table: dict[str, Any], *, where: str = "fault") -> None:
        super().__init__(table, where=where)
        self.target = check_target(self, table.get("target", "coordinator"))
        self.signal = parse_signal(self, "signal", table.get("signal", "SIGKILL"))
        self.checkpoint_delay_s = setting(self, "checkpoint_delay_s", 0.2, minimum=0)
        self.duration_s = table.get("duration_s", 30)
        self.watcher: OwnedThread | None = None

    def prepare(self, launch: Launch) -> None:
        launch.plan.checkpoint_delay_s = max(launch.plan.checkpoint_delay_s,
                                             float(self.checkpoint_delay_s))

    def invoke(self, ctx: Context) -> None:
        stale = _tmp_dirs(ctx.run_dir / "checkpoints")  # left by an earlier crash: not a write
        self.watcher = OwnedThread("checkpoint-crash", lambda stop: self._watch(ctx, stale, stop))

    def _watch(self, ctx: Context, stale: set[str], stopping: threading.Event) -> None:
        checkpoints = ctx.run_dir / "checkpoints"
        deadline = time.monotonic() + self.duration_s
        while not stopping.wait(POLL_S) and time.monotonic() < deadline:
            fresh = sorted(_tmp_dirs(checkpoints) - stale)
            if not fresh:
                continue
            tmp = fresh[0]
            pid = resolve(ctx, self, self.target)
            if pid is not None and send(ctx, self, pid, self.signal):
                ctx.history.record("killed_mid_checkpoint", fault=self.describe(), pid=pid,
                                   signal=self.signal.name, tmp=tmp,
                                   tmp_still_there=(checkpoints / tmp).exists())
            return
        ctx.history.record("no_checkpoint_seen", fault=self.describe())

    def heal(self, ctx: Context) -> None:
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            watcher.stop()


def _tmp_dirs(checkpoints: Path) -> set[str]:
    try:
        return {name for name in os.listdir(checkpoints)
                if name.startswith(".step-") and ".tmp-" in name}
    except FileNotFoundError:  # no checkpoints/ yet
        return set()


FAULT = CheckpointCrash
