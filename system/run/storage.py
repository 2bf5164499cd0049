"""What a write in the run directory can run out of, said in one line.

A full disk (ENOSPC), an exhausted quota (EDQUOT), a file-size limit (EFBIG, RLIMIT_FSIZE), a
file system gone read-only (EROFS) or a permission taken away (EACCES, EPERM) ends the run, but
never with a traceback: every write of the run directory (segments, manifests, events,
``run.json``, parameter files, logs) turns its ``OSError`` into a :class:`StorageError` whose
message names the path and the error. A run directory that cannot be used at all (a file, a
path under ``/proc``, a read-only mount) is a :class:`RunDirError`, a user's mistake (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from pipetrain.status import UserError


class StorageError(RuntimeError):
    """A write in the run directory failed; the message is one line naming path and error."""

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | Path | None = None) -> StorageError:
        return cls(describe(exc, path))


class RunDirError(UserError):
    """The run directory cannot be used at all (not a directory, not writable)."""


def describe(exc: OSError, path: str | Path | None = None) -> str:
    """``PATH: No space left on device (ENOSPC)``: the path the error is about, its text."""
    where = exc.filename if exc.filename is not None else path
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" + (f" ({code})" if code else "")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError.from_os_error(exc, path) from None
