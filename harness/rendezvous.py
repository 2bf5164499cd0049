"""Where a process of the run under test meets the harness at a fault point.

::

    target process (at a point the plan names)          harness (one owned thread)
      park(path, {"ids", "pid", "hook", "step", ...}) ──▶ accept, read the request
      ... blocked in recv ...                              handler(request): deliver the real
                                                           fault from outside (SIGKILL, SIGSTOP,
                                                           a storm, damage on disk), record it
      ◀───────────────── {"granted": [ids]} ────────────── reply, close

The target blocks in ``recv`` on a unix socket while the harness acts, so the fault finds it at
exactly that point of its program: a SIGKILL ends it there, a SIGSTOP freezes it there (it reads
the reply once continued), a SIGTERM's handler has run before it goes on, and every signal of a
storm sent to the coordinator is delivered before it reads its pending signals. Faults that act
in place (the link shim, planted bugs) use the same call to *claim* their landing, so each lands
once however many worker groups reach the point.

Why a unix socket: one connection per landing needs no framing beyond a line, the path goes in
the plan, the kernel tells the harness when a target dies (the reply's write fails, harmlessly),
and a target that has no harness (the path is gone) fails loudly instead of hanging. The socket
lives in a private directory under the system's temporary directory, as a socket path must be
short (108 bytes) and report directories can be deep.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from pipetrain.threads import start_helper

REQUEST_TIMEOUT_S = 10.0  # a client that connects and says nothing is dropped after this
MAX_REQUEST_BYTES = 1 << 16

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def park(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """Tell the harness this process reached a point; returns once it lets the process go.

    Blocks without a timeout on purpose: the harness may have stopped this process meanwhile.
    An end-of-file without a reply (the harness went away) lets the process go as well.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data) if data.strip() else {}


class Rendezvous:
    """The harness's end: a listening socket and the thread that answers it, one request at a
    time (landings are rare, and one at a time keeps the handler simple). Always ``stop``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.errors: list[str] = []
        self._dir = tempfile.mkdtemp(prefix="pth-")
        self.path = os.path.join(self._dir, "points.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(64)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    def start(self) -> Rendezvous:
        self._thread = start_helper(self._serve, name="rendezvous")
        return self

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                conn, _ = self._listener.accept()
                with conn:
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REQUEST_BYTES:
                chunk = conn.recv(65536)
                if not chunk:
                    return  # the process died before it finished asking
                data += chunk
            reply = self.handler(json.loads(data))
        except Exception as exc:  # noqa: BLE001 - a bad request must not end the server
            if len(self.errors) < 10:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            reply = {"granted": [], "error": str(exc)}
        # The target may be gone by now (a SIGKILL was the fault): nothing to tell it.
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")
