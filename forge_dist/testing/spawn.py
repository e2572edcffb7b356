"""Run a function on a fresh gloo world of N processes, for tests.

    results = spawn(fn, 2, arg, timeout=60)        # fn(rank, world_size, arg) on ranks 0 and 1

Each rank is a new interpreter (start method "spawn") joined by a file-based rendezvous in a
temporary directory (no port races), with MASTER_ADDR=127.0.0.1, GLOO_SOCKET_IFNAME=lo and one
OpenMP thread. The return value of rank 0 (or of every rank, ``return_all``) comes back pickled.

Failures never hang and never lose the cause: the first rank to raise has its traceback re-raised
in the parent as ``RankError`` naming the rank; after ``timeout`` seconds the ranks still running
are asked for their Python stacks (SIGUSR1 -> faulthandler), killed, and ``SpawnTimeout`` lists
them with the stacks they were stuck in.
``fn`` must be importable (a module-level function), as for any spawned process.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


class RankError(RuntimeError):
    """A rank of a spawned world raised; the message has its rank and its traceback."""

    def __init__(self, rank: int, world_size: int, text: str):
        super().__init__(f"rank {rank} of {world_size} failed:\n{text}")
        self.rank = rank


class SpawnTimeout(TimeoutError):
    """The world did not finish in time and was killed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _paths(workdir: str, rank: int):
    return (os.path.join(workdir, f"rank{rank}.result"), os.path.join(workdir, f"rank{rank}.error"),
            os.path.join(workdir, f"rank{rank}.stack"))


def _worker(rank: int, fn: Callable, world_size: int, workdir: str, port: int, deadline: float,
            backend: str, args: tuple, kwargs: dict) -> None:
    import torch.distributed as dist

    result_path, error_path, stack_path = _paths(workdir, rank)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    stack_file = open(stack_path, "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file)  # the parent asks for the stack of a hang
    # collectives time out after the parent's deadline, so the parent reports a hang with its stacks
    timeout = timedelta(seconds=max(deadline - time.time(), 0.0) + 60.0)
    try:
        dist.init_process_group(backend, init_method=f"file://{os.path.join(workdir, 'rendezvous')}",
                                rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args, **kwargs)
        with open(result_path + ".tmp", "wb") as f:
            pickle.dump(result, f)
        os.replace(result_path + ".tmp", result_path)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(error_path + ".tmp", "w") as f:
            f.write(f"{time.time()}\n{traceback.format_exc()}")
        os.replace(error_path + ".tmp", error_path)
        sys.exit(1)  # skip torch's own error report: the parent reads ours
    finally:
        faulthandler.unregister(signal.SIGUSR1)
        stack_file.close()
    # Leave without interpreter teardown: gloo's background threads occasionally abort a process at
    # exit ("terminate called without an active exception") after its result is already written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _first_error(workdir: str, world_size: int):
    """(rank, traceback) of the rank that failed first, or None."""
    found = []
    for r in range(world_size):
        path = _paths(workdir, r)[1]
        if os.path.exists(path):
            stamp, _, text = open(path).read().partition("\n")
            found.append((float(stamp), r, text))
    return min(found)[1:] if found else None


def spawn(fn: Callable, world_size: int, *args, timeout: float = 120.0, return_all: bool = False,
          backend: str = "gloo", **kwargs) -> Any:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank of a new world; return rank 0's
    result, or the list of all ranks' results with ``return_all``."""
    workdir = tempfile.mkdtemp(prefix="forge_spawn_")
    env_keep = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "MASTER_ADDR")}
    os.environ.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    try:
        wall_deadline = time.time() + timeout
        ctx = mp.start_processes(_worker, args=(fn, world_size, workdir, free_port(), wall_deadline, backend,
                                                args, kwargs), nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ctx.join(timeout=min(0.5, max(deadline - time.monotonic(), 0.01))):
                    break
            except mp.ProcessExitedException as e:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                _dump_stacks(ctx.processes, workdir, alive)
                _kill(ctx.processes)
                failed = _first_error(workdir, world_size)
                if failed is None:
                    failed = (e.error_index, f"exited with code {e.exit_code} (signal {e.signal_name}) "
                                             "without a Python traceback")
                raise RankError(failed[0], world_size, failed[1] + _stacks(workdir, alive)) from None
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                _dump_stacks(ctx.processes, workdir, alive)
                _kill(ctx.processes)
                raise SpawnTimeout(_timeout_message(workdir, world_size, timeout, alive))
        results: List[Any] = []
        for r in range(world_size):
            with open(_paths(workdir, r)[0], "rb") as f:
                results.append(pickle.load(f))
        return results if return_all else results[0]
    finally:
        for k, v in env_keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(workdir, ignore_errors=True)


def _dump_stacks(processes, workdir: str, ranks: List[int], wait: float = 2.0) -> None:
    """SIGUSR1 makes a rank in Python code write its stack (faulthandler); wait for the files."""
    for r in ranks:
        os.kill(processes[r].pid, signal.SIGUSR1)
    end = time.monotonic() + wait
    while time.monotonic() < end:
        if all(os.path.getsize(_paths(workdir, r)[2]) > 0 for r in ranks if os.path.exists(_paths(workdir, r)[2])):
            break
        time.sleep(0.1)


def _kill(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=10)


def _stacks(workdir: str, ranks: List[int]) -> str:
    out = []
    for r in ranks:
        path = _paths(workdir, r)[2]
        text = open(path).read().strip() if os.path.exists(path) else ""
        if text:
            out.append(f"\nrank {r} was stuck in:\n{text}")
    return "\n".join(out)


def _timeout_message(workdir: str, world_size: int, timeout: float, alive: List[int]) -> str:
    text = (f"world of {world_size} ranks did not finish within {timeout:.0f} s and was killed; "
            f"ranks still running: {alive}")
    failed = _first_error(workdir, world_size)
    if failed is not None:
        text += f"\nrank {failed[0]} had failed:\n{failed[1]}"
    return text + _stacks(workdir, alive)
