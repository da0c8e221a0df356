"""Process lifetimes: helpers that must not outlive their parent, torchrun ranks that end with
their launcher, and the lock a run holds on its output folder (Linux; best effort elsewhere)."""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Optional

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent_pid: Optional[int] = None) -> None:
    """In a child: receive `sig` when the parent thread dies (prctl PR_SET_PDEATHSIG), and exit at
    once if the parent `parent_pid` is already gone (it died before prctl took effect)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):  # not Linux
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """In a child: a daemon thread that ends this process (os._exit) once `parent_pid` is no
    longer its parent. Polling, unlike PR_SET_PDEATHSIG, does not depend on which thread of the
    parent forked the child: use it for helpers forked from threads that may end first."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


_WATCHING_LAUNCHER = False


def end_with_launcher(poll_s: float = 0.5) -> None:
    """Under torchrun (TORCHELASTIC_RUN_ID set): end this rank once its launcher is gone.

    torchrun starts each rank in its own session, so killing the launcher's process group
    leaves the ranks running (still writing checkpoints and metrics). A watchdog thread
    (`exit_with_parent`, which unlike PR_SET_PDEATHSIG does not depend on which launcher thread
    started the rank) ends the rank within `poll_s` of the launcher's death. The `masa` command
    calls it first thing, and init_parallel again (idempotent)."""
    global _WATCHING_LAUNCHER
    if _WATCHING_LAUNCHER or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _WATCHING_LAUNCHER = True
    if os.getppid() == 1:                    # the launcher died before the watch started
        os._exit(0)
    exit_with_parent(os.getppid(), poll_s)


class FolderLock:
    """An exclusive lock on `folder` held by this process: fcntl.flock on `<folder>/.masa.lock`,
    released by the OS when the process ends however it ends (SIGKILL included). The file
    names the holder (pid, host, start time, command) for the refusal message. Children forked
    while it is held close their copy of the descriptor, so an orphaned helper cannot keep it.

        with FolderLock(out, "trainer.output_dir"):   # UserError naming the holder if taken
            ...
    """

    NAME = ".masa.lock"

    def __init__(self, folder, field: str):
        from pathlib import Path
        self.folder, self.field = Path(folder), field
        self.path = self.folder / self.NAME
        self._fd: Optional[int] = None

    def holder(self) -> dict:
        import json
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "FolderLock":
        import fcntl
        import json
        import socket
        import sys
        import time

        from masa_megatron.errors import UserError
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = self.holder()
            raise UserError(
                f"{self.field} {self.folder}: in use by another run (pid {info.get('pid', '?')} "
                f"on host {info.get('host', '?')}, started {info.get('started', '?')}: "
                f"{info.get('command', '?')}); wait for it to end or stop it "
                f"(lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        _HELD_LOCK_FDS[fd] = os.getpid()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None and _HELD_LOCK_FDS.pop(self._fd, None) == os.getpid():
            os.close(self._fd)               # the last descriptor: the lock is released
        self._fd = None


def output_lock(folder, field: str):
    """The lock a run holds on its output folder: a FolderLock on rank 0 (RANK), nothing on the
    other ranks (they end with their launcher, see end_with_launcher)."""
    import contextlib
    rank0 = int(os.environ.get("RANK", "0")) == 0
    return FolderLock(folder, field) if rank0 else contextlib.nullcontext()


_HELD_LOCK_FDS: dict = {}                    # fd -> pid of the process that took the lock


def _close_locks_in_child() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)
