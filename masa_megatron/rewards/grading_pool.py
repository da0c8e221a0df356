"""Time-limited worker processes for math-verify comparisons (used by rewards.math).

math-verify's own time limit relies on SIGALRM (main thread only), so every comparison runs here
with that limit disabled: a worker still busy `timeout_s` seconds after it received an item is
killed (SIGKILL) and replaced, and that item scores 0. This works from any thread. Workers are
forked from a "zygote" process that imported math-verify once (started with `python -c`, so the
caller's __main__ is never re-imported), which makes a replacement cost milliseconds. Workers die
with the zygote (PR_SET_PDEATHSIG), and the zygote exits when its control socket closes.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Sequence

from masa_megatron.lifecycle import die_with_parent

WORKER_STARTUP_TIMEOUT_S = 120.0
_MAX_DEATHS_IN_A_ROW = 50
# Address-space cap per worker (guards against 10^{10^{10}}-style blow-ups); None disables it.
WORKER_MEMORY_LIMIT_BYTES: int | None = 4 << 30


# ----------------------------------------------------------------------------- worker side
def _worker_main(fd: int, memory_limit_bytes: int | None, parent_pid: int) -> None:
    """Worker loop on socket `fd`: receive (task_id, answer, reference), send (task_id, score)."""
    die_with_parent(signal.SIGKILL, parent_pid)   # a stuck worker must not outlive the zygote
    from masa_megatron.rewards.math import verify_answer   # imported by the zygote already
    try:
        import resource

        if memory_limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    except (ImportError, ValueError, OSError):  # no resource module, or a lower hard limit
        pass
    conn = multiprocessing.connection.Connection(fd)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, answer, reference = message
        try:
            score = verify_answer(answer, reference)
        except SystemExit:
            return
        except BaseException:  # noqa: BLE001 - RecursionError, MemoryError, parser errors: score 0
            score = 0.0
        try:
            conn.send((task_id, score))
        except (OSError, ValueError):
            return


def _zygote_main(control_fd: int, memory_limit_bytes: int | None) -> None:
    """Import and warm up math-verify once, then fork one worker per request on `control_fd`.

    A request is one byte carrying the worker's socket (SCM_RIGHTS); the reply is the worker's pid.
    The zygote exits when the control socket closes (the parent exited or shut the pool down);
    its workers then receive SIGKILL (PR_SET_PDEATHSIG).
    """
    from masa_megatron.rewards.math import verify_answer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped automatically
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        verify_answer("1", "1")
    except BaseException:  # noqa: BLE001
        pass
    control = socket.socket(fileno=control_fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not message or not fds:
            os._exit(0)  # skip interpreter finalisation; workers die with us (PDEATHSIG)
        pid = os.fork()
        if pid == 0:
            try:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _worker_main(fds[0], memory_limit_bytes, os.getppid())
            finally:
                os._exit(0)
        os.close(fds[0])
        try:
            control.sendall(pid.to_bytes(8, "little"))
        except OSError:
            return


# ----------------------------------------------------------------------------- parent side
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Zygote:
    """The fork server, started with `python -c` (not multiprocessing), so that the caller's
    __main__ module is never re-imported, and workers start in milliseconds."""

    def __init__(self, memory_limit_bytes: int | None):
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        code = (f"from masa_megatron.rewards.grading_pool import _zygote_main; "
                f"_zygote_main({child_sock.fileno()}, {memory_limit_bytes!r})")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(child_sock.fileno(),), env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True)
        finally:
            child_sock.close()
        parent_sock.settimeout(WORKER_STARTUP_TIMEOUT_S)
        self.control = parent_sock
        self._lock = threading.Lock()

    def spawn(self) -> "_Worker":
        ours, theirs = socket.socketpair()
        try:
            with self._lock:
                socket.send_fds(self.control, [b"w"], [theirs.fileno()])
                reply = b""
                while len(reply) < 8:
                    chunk = self.control.recv(8 - len(reply))
                    if not chunk:
                        raise ConnectionError("grading zygote exited")
                    reply += chunk
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Worker(int.from_bytes(reply, "little"), ours)

    def close(self) -> None:
        try:
            self.control.close()
            self.process.wait(timeout=5)
        except Exception:  # noqa: BLE001 - best effort
            self.process.kill()


class _Worker:
    def __init__(self, pid: int, sock: socket.socket):
        self.pid = pid
        self.conn = multiprocessing.connection.Connection(sock.detach())
        self.ready = False
        self.started_at = time.monotonic()
        self.task: tuple[int, int, float] | None = None  # (task_id, item index, deadline)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.conn.close()
        except OSError:
            pass


class GradingPool:
    """Worker processes with a hard per-item time limit. Thread-safe (one batch at a time)."""

    def __init__(self, workers: int, memory_limit_bytes: int | None = WORKER_MEMORY_LIMIT_BYTES):
        self._memory_limit = memory_limit_bytes
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._next_task_id = 0
        self._deaths = 0  # workers that died in a row without returning a result
        self.owner_pid = os.getpid()
        self._zygote = _Zygote(memory_limit_bytes)
        self._grow(max(1, workers))

    def _spawn(self) -> _Worker:
        try:
            return self._zygote.spawn()
        except (OSError, ValueError):  # the zygote died (OOM killer, ...): start a new one once
            self._zygote.close()
            self._zygote = _Zygote(self._memory_limit)
            return self._zygote.spawn()

    def _grow(self, n: int) -> None:
        while len(self._workers) < n:
            self._workers.append(self._spawn())

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def map(self, items: Sequence[tuple[str, str]], timeout_s: float, workers: int | None = None
            ) -> list[float]:
        """Score (answer, reference) pairs; an item still running after timeout_s scores 0."""
        with self._lock:
            self._grow(workers or 1)
            active = self._workers[: workers] if workers else self._workers
            try:
                return self._run(items, timeout_s, len(active))
            except BaseException:  # e.g. KeyboardInterrupt: never leave a task in flight
                for worker in list(self._workers):
                    if worker.task is not None:
                        self._replace(worker)
                raise

    def _run(self, items, timeout_s: float, n_active: int) -> list[float]:
        results = [0.0] * len(items)
        pending = deque(range(len(items)))
        in_flight: dict[int, _Worker] = {}  # task_id -> worker
        while pending or in_flight:
            workers = self._workers[:n_active]
            for worker in workers:
                if pending and worker.ready and worker.task is None:
                    if worker.conn.poll(0):  # an idle worker is readable only once it has died
                        self._receive(worker, results, in_flight)
                        continue
                    index = pending.popleft()
                    task_id = self._next_task_id = self._next_task_id + 1
                    try:
                        worker.conn.send((task_id, items[index][0], items[index][1]))
                    except (OSError, ValueError):
                        self._replace(worker)  # results[index] stays 0
                        continue
                    worker.task = (task_id, index, time.monotonic() + timeout_s)
                    in_flight[task_id] = worker
            now = time.monotonic()
            if pending and not any(w.ready for w in workers):
                oldest = min(w.started_at for w in workers)
                if now - oldest > WORKER_STARTUP_TIMEOUT_S or self._deaths > _MAX_DEATHS_IN_A_ROW:
                    raise RuntimeError("math grading workers failed to start")
            deadlines = [w.task[2] for w in workers if w.task is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            waiting = [w for w in workers if w.task is not None or not w.ready]
            ready_conns = multiprocessing.connection.wait([w.conn for w in waiting], timeout=wait_s)
            for worker in waiting:
                if worker.conn in ready_conns:
                    self._receive(worker, results, in_flight)
            now = time.monotonic()
            for worker in list(self._workers[:n_active]):
                if worker.task is not None and now >= worker.task[2]:
                    in_flight.pop(worker.task[0], None)  # results[index] stays 0
                    self._replace(worker)
        return results

    def _receive(self, worker: _Worker, results: list[float], in_flight: dict) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError, ValueError):  # the worker died (segfault, OOM kill, ...)
            if worker.task is not None:
                in_flight.pop(worker.task[0], None)
            self._deaths += 1
            self._replace(worker)
            return
        if message[0] == "ready":
            worker.ready = True
            return
        task_id, score = message
        if worker.task is not None and worker.task[0] == task_id:
            self._deaths = 0
            results[worker.task[1]] = float(score)
            in_flight.pop(task_id, None)
            worker.task = None

    def shutdown(self) -> None:
        """Stop the workers and the zygote (closing the zygote's socket makes it exit)."""
        with self._lock:
            for worker in self._workers:
                try:
                    worker.conn.send(None)
                except (OSError, ValueError):
                    pass
                worker.kill()
            self._workers.clear()
            self._zygote.close()


_POOL: GradingPool | None = None
_POOL_LOCK = threading.Lock()


def default_workers() -> int:
    """$MASA_GRADER_WORKERS if set (e.g. to share cores between ranks), else the usable cores."""
    env = os.environ.get("MASA_GRADER_WORKERS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 32))


def get_pool(workers: int | None = None) -> GradingPool:
    """The lazily created module-level pool (recreated in a forked child process)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.owner_pid != os.getpid():
            _POOL = GradingPool(max(workers or 0, default_workers()))
        return _POOL


def shutdown_pool() -> None:
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.owner_pid == os.getpid():
        pool.shutdown()


atexit.register(shutdown_pool)
