"""All-reduce throughput among R processes over pipes, against a raw pipe copy of the same bytes.

Each replica is a real process (``multiprocessing`` fork) holding ``--mib`` MiB of float32
gradients; the chain all-reduce of ``pipetrain.wire.allreduce`` runs over ``PipeChannel`` s.
The figure is bytes of gradient reduced per second per replica (buffer size / wall time of one
all-reduce).
The baseline moves the same bytes once through one raw ``os.pipe`` between two processes.

    python bench/allreduce.py --mib 12 --replicas 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np

from pipetrain.wire.allreduce import chain_allreduce
from pipetrain.wire.frames import Kind
from pipetrain.wire.pipe import PipeChannel


def _replica(rank: int, size: int, fds: dict, nbytes: int, repeats: int, out) -> None:
    nxt = PipeChannel(fds.get("next_in"), fds.get("next_out"), name="next") \
        if "next_in" in fds else None
    prv = PipeChannel(fds.get("prev_in"), fds.get("prev_out"), name="prev") \
        if "prev_in" in fds else None
    grads = np.full(nbytes // 4, rank + 1, dtype=np.float32)
    links = {
        "send_next": (lambda i, a: nxt.send_frame(Kind.REDUCE, 1, i, a)) if nxt else None,
        "recv_next": (lambda i: nxt.recv_frame().array) if nxt else None,
        "send_prev": (lambda i, a: prv.send_frame(Kind.REDUCE, 1, i, a)) if prv else None,
        "recv_prev": (lambda i: prv.recv_frame().array) if prv else None,
    }
    times = []
    for _ in range(repeats):
        flat = grads.copy()
        started = time.perf_counter()
        chain_allreduce(flat, rank, size, **links)
        times.append(time.perf_counter() - started)
    if rank == 0:
        out.send(times)


def allreduce_times(replicas: int, nbytes: int, repeats: int) -> list[float]:
    ctx = mp.get_context("fork")  # the children inherit the pipe fds; no threads exist here
    fds: list[dict] = [{} for _ in range(replicas)]
    opened = []
    for r in range(replicas - 1):
        fwd_r, fwd_w = os.pipe()
        back_r, back_w = os.pipe()
        opened += [fwd_r, fwd_w, back_r, back_w]
        fds[r].update(next_in=back_r, next_out=fwd_w)
        fds[r + 1].update(prev_in=fwd_r, prev_out=back_w)
    for fd in opened:
        os.set_inheritable(fd, True)
    receiver, sender = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_replica, args=(r, replicas, fds[r], nbytes, repeats, sender))
             for r in range(replicas)]
    for proc in procs:
        proc.start()
    for fd in opened:
        os.close(fd)
    times = receiver.recv()
    for proc in procs:
        proc.join()
    receiver.close()
    sender.close()
    return times


def _raw_writer(fd: int, nbytes: int, repeats: int) -> None:
    data = memoryview(bytes(nbytes))
    for _ in range(repeats):
        sent = 0
        while sent < nbytes:
            sent += os.write(fd, data[sent:])
    os.close(fd)


def raw_pipe_times(nbytes: int, repeats: int) -> list[float]:
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    proc = mp.get_context("fork").Process(target=_raw_writer, args=(write_fd, nbytes, repeats))
    proc.start()
    os.close(write_fd)
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        got = 0
        while got < nbytes:
            got += os.readv(read_fd, [view[got:]])
        times.append(time.perf_counter() - started)
    proc.join()
    os.close(read_fd)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=12.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    nbytes = int(args.mib * (1 << 20)) // 4 * 4
    reduce_s = statistics.median(allreduce_times(args.replicas, nbytes, args.repeats))
    raw_s = statistics.median(raw_pipe_times(nbytes, args.repeats))
    print(json.dumps({
        "replicas": args.replicas, "mib": args.mib,
        "allreduce_gb_per_s_per_replica": round(nbytes / reduce_s / 1e9, 3),
        "raw_pipe_gb_per_s": round(nbytes / raw_s / 1e9, 3),
        "ratio": round(raw_s / reduce_s, 3),
    }))


if __name__ == "__main__":
    main()
