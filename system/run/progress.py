"""Progress on the terminal: a bar when stderr is a terminal, a line per epoch otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total_steps: int, *, quiet: bool = False, stream: TextIO | None = None):
        self.total = total_steps
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.is_tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0

    def step(self, step: int, epoch: int, loss: float) -> None:
        if self.quiet or not self.is_tty:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1 and step != self.total:
            return
        self._last_draw = now
        width = 30
        filled = int(width * step / max(self.total, 1))
        rate = step / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"epoch {epoch + 1} loss {loss:.4f} {rate:.0f} steps/s"
        )
        self.stream.flush()

    def epoch(self, epoch: int, loss: float, accuracy: float | None) -> None:
        if self.quiet:
            return
        acc = f" held-out accuracy {accuracy:.4f}" if accuracy is not None else ""
        prefix = "\n" if self.is_tty else ""
        self.stream.write(f"{prefix}epoch {epoch + 1}: loss {loss:.4f}{acc}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()
