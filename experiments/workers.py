"""A small pool of worker processes for sweeps, safe with numba's and torch's thread pools.

Each worker is a fresh interpreter (the ``spawn`` start method), runs one task at a time and
gets its share of the cores for numba, torch and OpenMP. The parent hands out tasks and
watches every worker:

- a task that raises is a failed task; the worker goes on with the next one;
- a worker that dies (killed, out of memory, a crash in native code) fails the task it held,
  and a new worker takes its place;
- a worker that holds a task without using any CPU time for ``stall_s`` seconds is hung (a
  deadlocked thread pool spends none), and is killed like a dead one; so is a task that runs
  longer than ``timeout_s``;
- Ctrl-C (or closing the generator) ends every worker at once.

Why not ``concurrent.futures.ProcessPoolExecutor``: with the default ``fork`` start method on
Linux its workers inherit the parent's running numba/OpenMP and torch thread pools, which are
not safe to use after a fork, and the first parallel kernel in a worker waits forever; and when
one worker dies the executor marks every pending task broken, without saying whose was lost.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator, Sequence

POLL_S = 0.5
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


class WorkerInitError(RuntimeError):
    """A worker could not start: its initializer raised (that exception is ``__cause__``), or it
    died before it was ready."""


@dataclass(frozen=True)
class Failed:
    """The result of a task that did not finish: ``reason`` is one line, ``detail`` a traceback or ''."""

    reason: str
    detail: str = ""


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Each worker's share of the cores: cores // workers, at least 1."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch's and numba's pools in this process."""
    import numba
    import torch
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _worker_main(conn, payload: bytes, threads: int) -> None:
    # Ctrl-C goes to the whole process group; the parent decides, so a worker ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in THREAD_ENV:  # read when the libraries are first imported, which is below
        os.environ[var] = str(threads)
    set_threads(threads)
    init, initargs = pickle.loads(payload)  # after set_threads: the modules it imports see the thread count
    try:
        if init is not None:
            init(*initargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops the pool
        try:
            conn.send(("init_error", e, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - an exception that does not pickle goes as text
            conn.send(("init_error", RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        index, fn, args = msg
        try:
            conn.send(("ok", index, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - the task failed, the worker goes on
            conn.send(("error", index, f"{type(e).__name__}: {e}", traceback.format_exc()))


class _Worker:
    """One worker process, its end of the pipe, and the task it holds."""

    def __init__(self, ctx, payload: bytes, threads: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, payload, threads), daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.ready = False
        self.started = self.last_busy = time.monotonic()
        self.cpu = 0.0

    def give(self, index: int, fn: Callable, args: tuple) -> None:
        self.conn.send((index, fn, args))
        self.task, self.started, self.last_busy = index, time.monotonic(), time.monotonic()
        self.cpu = _cpu_seconds(self.proc.pid) or 0.0

    def idle_for(self) -> float:
        """Seconds since this worker last used CPU time (0 where that cannot be read)."""
        now, cpu = time.monotonic(), _cpu_seconds(self.proc.pid)
        if cpu is None or cpu > self.cpu:
            self.cpu, self.last_busy = cpu or self.cpu, now
        return now - self.last_busy

    def stop(self, grace_s: float = 2.0) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(0 if self.task is not None else grace_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(grace_s)
        self.conn.close()


def run_tasks(fn: Callable, tasks: Sequence[tuple], *, workers: int, init: Callable | None = None,
              initargs: tuple = (), threads: int | None = None, stall_s: float | None = 300.0,
              timeout_s: float | None = None, on_ready: Callable[[], None] | None = None
              ) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*tasks[i])`` on ``workers`` spawned processes; yield ``(i, result)`` as tasks finish,
    where a task that did not finish gives a :class:`Failed`. ``fn`` and ``init`` must be
    module-level functions (they are pickled by name). ``init(*initargs)`` runs once in each worker;
    if it fails, :class:`WorkerInitError` is raised. ``threads``: per worker (default: the cores
    shared out, :func:`threads_per_worker`). ``on_ready()`` is called once, when the first worker
    has started (so a caller can tell a failed start from a run in progress)."""
    ctx = mp.get_context("spawn")
    payload = pickle.dumps((init, initargs))
    threads = threads or threads_per_worker(workers)
    todo = list(range(len(tasks)))[::-1]  # a stack: pop() hands out tasks in order
    pool = [_Worker(ctx, payload, threads) for _ in range(min(workers, len(tasks)))]
    pending = len(tasks)
    try:
        while pending:
            if on_ready is not None and any(w.ready for w in pool):
                on_ready()
                on_ready = None
            for w in pool:
                if w.ready and w.task is None and todo:
                    i = todo.pop()
                    w.give(i, fn, tasks[i])
            for i, result, w in _collect(pool, stall_s, timeout_s):
                if result is not None:
                    pending -= 1
                    yield i, result
                if w is not None:  # a dead or killed worker: replaced while tasks remain
                    pool.remove(w)
                    if todo:
                        pool.append(_Worker(ctx, payload, threads))
    finally:
        for w in pool:
            w.stop()


def _collect(pool: list[_Worker], stall_s, timeout_s):
    """Wait up to POLL_S for messages and deaths; yield ``(task, result or None, dead worker or None)``."""
    by_conn = {w.conn: w for w in pool}
    by_sentinel = {w.proc.sentinel: w for w in pool}
    for obj in wait(list(by_conn) + list(by_sentinel), timeout=POLL_S):
        if obj in by_conn:
            w = by_conn[obj]
            try:
                msg = w.conn.recv()
            except (EOFError, OSError):
                continue  # it died: its sentinel says so
            yield from _on_message(w, msg)
    for w in pool:
        if w.proc.is_alive() and not w.conn.poll():
            reason = _hung(w, stall_s, timeout_s)
            if reason is None:
                continue
            w.proc.kill()
        elif w.proc.is_alive():
            continue  # a message is waiting: read it on the next round
        else:
            reason = f"worker process died (exit code {w.proc.exitcode})"
        w.proc.join()
        if not w.ready:
            raise WorkerInitError(f"a worker died while starting: {reason}")
        yield w.task, (Failed(reason) if w.task is not None else None), w


def _on_message(w: _Worker, msg: tuple):
    kind = msg[0]
    if kind == "ready":
        w.ready = True
    elif kind == "init_error":  # the worker's own exception is the cause
        raise WorkerInitError(f"a worker could not start: {type(msg[1]).__name__}: {msg[1]}") from msg[1]
    elif kind == "ok":
        w.task = None
        yield msg[1], msg[2], None
    else:  # "error"
        w.task = None
        yield msg[1], Failed(msg[2], msg[3]), None


def _hung(w: _Worker, stall_s, timeout_s) -> str | None:
    """Why a live worker holding a task counts as hung, or None."""
    if w.task is None:
        return None
    if timeout_s is not None and time.monotonic() - w.started > timeout_s:
        return f"the task ran longer than {timeout_s:g} s"
    if stall_s is not None and w.idle_for() > stall_s:
        return f"the worker used no CPU time for {stall_s:g} s (hung)"
    return None
