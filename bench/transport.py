"""Transport: pipetrain frames against a raw os.pipe copy and multiprocessing.Connection.

Each measurement forks one writer process that sends ``count`` messages of ``size`` bytes to the
parent over one pipe; the parent reads them into a preallocated buffer and times from the go byte
it sends to the last byte received (the writer's start-up is outside the clock). Methods:

- ``raw os.pipe``: ``os.write`` of the bytes / ``os.readv`` into the buffer, blocking, plain
  ``os.pipe()`` (the kernel's default 64 KiB buffer).
- ``raw os.pipe, 1 MiB buffer``: the same with the pipe buffer raised as pipetrain raises it.
  The better of these two raw copies (per size) is the baseline the targets are judged on.
- ``pipetrain frames``: ``PipeChannel.send_frame`` / ``recv_frame(out=...)``: the 68-byte header,
  CRC32C of header and payload, ``writev`` from and ``readv`` into the array.
- ``pipetrain frames, new array``: ``recv_frame()`` allocating each array (what the inbox
  receiver threads do).
- ``mp.Connection bytes``: ``send_bytes`` / ``recv_bytes_into`` of ``multiprocessing.Pipe``.
- ``mp.Connection pickle``: ``send(array)`` / ``recv()``, the usual way to pass an array.

    python -m bench.transport [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time

import numpy as np

KIB, MIB = 1024, 1024 * 1024
SIZES = (64 * KIB, 1 * MIB, 8 * MIB)
BASELINE = "raw os.pipe"
METHODS = (
    "raw os.pipe",
    "raw os.pipe, 1 MiB buffer",
    "pipetrain frames",
    "pipetrain frames, new array",
    "mp.Connection bytes",
    "mp.Connection pickle",
)


def _size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _read_into(fd: int, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("writer closed the pipe early")
        got += n


def _grow(fd: int) -> None:
    from pipetrain.wire.pipe import _grow_pipe

    _grow_pipe(fd)


def _sender(method: str, size: int, count: int, go_r: int, endpoint) -> None:
    """In the forked child: wait for the go byte, then send ``count`` messages."""
    payload = np.full(size // 4, 1.5, dtype=np.float32)  # touched before the clock starts
    view = memoryview(payload).cast("B")
    os.read(go_r, 1)
    if method.startswith("raw"):
        for _ in range(count):
            _write_all(endpoint, view)
    elif method.startswith("pipetrain"):
        from pipetrain.wire.frames import Kind

        for i in range(count):
            endpoint.send_frame(Kind.ACTIVATION, 1, i, payload)
    elif method == "mp.Connection bytes":
        for _ in range(count):
            endpoint.send_bytes(view)
    else:
        for _ in range(count):
            endpoint.send(payload)


def measure(method: str, size: int, count: int) -> float:
    """Bytes per second of payload for ``count`` messages of ``size`` bytes."""
    from pipetrain.wire.pipe import PipeChannel, open_pipe

    go_r, go_w = os.pipe()
    if method.startswith("raw") or method.startswith("pipetrain"):
        read_fd, write_fd = open_pipe()
        if method == "raw os.pipe, 1 MiB buffer":
            _grow(read_fd)
        if method.startswith("pipetrain"):  # PipeChannel raises the buffer itself
            receiver_end = lambda: PipeChannel(read_fd, None, name="bench reader")  # noqa: E731
            sender_end = lambda: PipeChannel(None, write_fd, name="bench writer")  # noqa: E731
        else:
            receiver_end, sender_end = (lambda: read_fd), (lambda: write_fd)
        child_close, parent_close = read_fd, write_fd
    else:
        reader, writer = multiprocessing.Pipe(duplex=False)
        receiver_end, sender_end = (lambda: reader), (lambda: writer)
        child_close = parent_close = None

    pid = os.fork()
    if pid == 0:  # the writer
        status = 0
        try:
            os.close(go_w)
            if child_close is not None:
                os.close(child_close)
            else:
                reader.close()
            _sender(method, size, count, go_r, sender_end())
        except BaseException:  # noqa: BLE001 - report and leave without running atexit hooks
            import traceback

            traceback.print_exc()
            status = 1
        os._exit(status)

    os.close(go_r)
    if parent_close is not None:
        os.close(parent_close)
    else:
        writer.close()
    end = receiver_end()
    buffer = np.empty(size // 4, dtype=np.float32)
    view = memoryview(buffer).cast("B")
    try:
        started = time.perf_counter()
        os.write(go_w, b"g")
        if method.startswith("raw"):
            for _ in range(count):
                _read_into(end, view)
        elif method == "pipetrain frames":
            for _ in range(count):
                end.recv_frame(out=buffer)
        elif method == "pipetrain frames, new array":
            for _ in range(count):
                end.recv_frame()
        elif method == "mp.Connection bytes":
            for _ in range(count):
                end.recv_bytes_into(view)
        else:
            for _ in range(count):
                end.recv()
        elapsed = time.perf_counter() - started
    finally:
        os.close(go_w)
        if isinstance(end, int):
            os.close(end)
        else:
            end.close()
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"transport writer for {method} {size} exited with status {status}")
    return size * count / elapsed


def run(repeats: int, *, quick: bool = False, log=print, gate=None) -> dict:
    """Every method at every size, alternating methods within each repeat; ``gate(what)`` is
    called before each size's batch of measurements (the suite waits there for a quiet
    machine)."""
    total = 16 * MIB if quick else 512 * MIB
    samples: dict[tuple[str, int], list[float]] = {(m, s): [] for m in METHODS for s in SIZES}
    for repeat in range(repeats):
        for size in SIZES:
            count = max(4, total // size)
            if gate is not None:
                gate(f"transport {_size_label(size)}")
            for method in METHODS:
                samples[method, size].append(measure(method, size, count))
        log(f"  transport repeat {repeat + 1}/{repeats}: " + ", ".join(
            f"{_size_label(s)} frames {statistics.median(samples['pipetrain frames', s]) / 1e9:.2f}"
            f" / raw {statistics.median(samples[BASELINE, s]) / 1e9:.2f} GB/s" for s in SIZES))
    rows = []
    for (method, size), values in samples.items():
        base = samples[BASELINE, size]
        best_raw = max(statistics.median(samples[m, size]) for m in METHODS if m.startswith("raw"))
        rows.append({
            "method": method, "size_bytes": size, "size": _size_label(size),
            "messages_per_repeat": max(4, total // size),
            "median_gb_s": statistics.median(values) / 1e9,
            "min_gb_s": min(values) / 1e9, "max_gb_s": max(values) / 1e9,
            "samples_gb_s": [v / 1e9 for v in values],
            "ratio_vs_raw": statistics.median(values) / statistics.median(base),
            "ratio_vs_raw_1mib": statistics.median(values) / statistics.median(
                samples["raw os.pipe, 1 MiB buffer", size]),
            "ratio_vs_best_raw": statistics.median(values) / best_raw,
        })
    return {"baseline": BASELINE, "methods": list(METHODS),
            "sizes": [_size_label(s) for s in SIZES], "repeats": repeats,
            "bytes_per_repeat": total, "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    result = run(args.repeats, quick=args.quick, log=lambda m: print(m, file=sys.stderr))
    for row in result["results"]:
        print(f"{row['size']:>7} {row['method']:30} {row['median_gb_s']:6.2f} GB/s "
              f"({row['min_gb_s']:.2f}-{row['max_gb_s']:.2f})  x{row['ratio_vs_raw']:.2f} raw")
    print(json.dumps({"repeats": result["repeats"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
