"""experiments.workers: the sweep's process pool. Tasks are module-level functions of this file,
so the spawned workers import them by name."""
import os
import signal
import time

import pytest

from experiments import workers


def square(x):
    return x * x


def square_or_raise(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x, os.getpid()


def square_or_die(x):
    if x == 2:
        time.sleep(0.2)  # mid-task: the worker has started on it
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def sleep_forever(x):
    if x == 1:
        time.sleep(600)  # uses no CPU time, like a deadlocked thread pool
    return x


def spin_forever(x):
    while True:  # uses CPU all the time: only the task timeout catches it
        x += 1


def thread_counts(_):
    import numba
    import torch
    return torch.get_num_threads(), numba.get_num_threads(), os.environ["OMP_NUM_THREADS"]


def failing_init():
    raise KeyError("no such model")


def results(gen):
    return dict(gen)


def test_every_task_runs_once_and_results_come_back_by_index():
    out = results(workers.run_tasks(square, [(i,) for i in range(7)], workers=2))
    assert out == {i: i * i for i in range(7)}


def test_a_task_that_raises_fails_alone_and_its_worker_goes_on():
    out = results(workers.run_tasks(square_or_raise, [(i,) for i in range(6)], workers=2))
    assert isinstance(out[3], workers.Failed)
    assert out[3].reason == "ValueError: three is not allowed" and "Traceback" in out[3].detail
    ok = {i: r for i, r in out.items() if i != 3}
    assert {i: r[0] for i, r in ok.items()} == {i: i * i for i in ok}
    assert len({pid for _, pid in ok.values()}) <= 2  # no worker was replaced


def test_a_worker_killed_mid_task_fails_that_task_and_the_others_finish():
    t0 = time.monotonic()
    out = results(workers.run_tasks(square_or_die, [(i,) for i in range(5)], workers=2))
    assert isinstance(out[2], workers.Failed) and "died" in out[2].reason and "-9" in out[2].reason
    assert {i: out[i] for i in (0, 1, 3, 4)} == {0: 0, 1: 1, 3: 9, 4: 16}
    assert time.monotonic() - t0 < 60


def test_a_worker_that_uses_no_cpu_is_hung_and_its_task_fails():
    t0 = time.monotonic()
    out = results(workers.run_tasks(sleep_forever, [(i,) for i in range(3)], workers=2, stall_s=1.0))
    assert isinstance(out[1], workers.Failed) and "no CPU time" in out[1].reason
    assert out[0] == 0 and out[2] == 2
    assert time.monotonic() - t0 < 30


def test_a_task_over_its_time_limit_fails():
    out = results(workers.run_tasks(spin_forever, [(0,)], workers=1, timeout_s=1.0))
    assert isinstance(out[0], workers.Failed) and "longer than 1 s" in out[0].reason


def test_each_worker_gets_its_share_of_the_cores():
    assert workers.threads_per_worker(2, cores=2) == 1 and workers.threads_per_worker(3, cores=8) == 2
    assert workers.threads_per_worker(4, cores=2) == 1
    out = results(workers.run_tasks(thread_counts, [(0,), (1,)], workers=2, threads=3))
    assert set(out.values()) == {(3, 3, "3")}


def test_a_failing_initializer_stops_the_pool_with_its_own_error():
    with pytest.raises(workers.WorkerInitError) as e:
        results(workers.run_tasks(square, [(1,), (2,)], workers=2, init=failing_init))
    assert isinstance(e.value.__cause__, KeyError) and "no such model" in str(e.value)


def test_stopping_early_ends_every_worker():
    gen = workers.run_tasks(sleep_forever, [(0,), (1,), (1,)], workers=3, stall_s=None)
    assert next(gen) == (0, 0)
    t0 = time.monotonic()
    gen.close()  # what Ctrl-C does to the sweep's loop
    assert time.monotonic() - t0 < 10
    assert not [p for p in _children() if "spawn_main" in p]


def _children() -> list[str]:
    me = str(os.getpid())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if stat[1] == me and stat[0] != "Z":
            found.append(cmd)
    return found
