"""Child processes that must not outlive their parent (Linux; best effort elsewhere)."""
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
