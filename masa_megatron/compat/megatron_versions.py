"""Differences between the supported megatron-core releases (0.16.x on Python 3.11, 0.19.x on
Python 3.12 clusters) that this package papers over. Each helper checks what exists (hasattr)
rather than comparing version numbers, so a release in between works too.
"""
from __future__ import annotations

import multiprocessing
import os


def megatron_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return tuple(int(x) for x in package_info.__version__.split(".")[:3] if x.isdigit())


def use_fork_for_checkpoint_queue() -> None:
    """Create dist_checkpointing's write-results queue in a *forked* manager process.

    Megatron creates it lazily with a spawn-context Manager, whose server process re-imports the
    caller's `__main__`: a script without an `if __name__ == "__main__":` guard hangs forever, and
    one with heavy top-level imports pays them again on every first save (seconds). A forked
    manager runs only the queue server and inherits everything; it exits when this process dies,
    SIGKILL included (without that it was left running). No-op when the private global is absent
    (a release that changed this) or already set."""
    from multiprocessing.managers import SyncManager

    from masa_megatron.lifecycle import exit_with_parent

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(initializer=exit_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()   # the proxy keeps the manager alive


def leave_inference_mode() -> None:
    """0.19+: Megatron's inference engines set a process-wide `InferenceMode` flag that changes
    the forward path; unset it before training or log-prob forwards. No-op on 0.16."""
    try:
        from megatron.core.inference.utils import InferenceMode
    except ImportError:
        return
    if hasattr(InferenceMode, "unset_active"):
        InferenceMode.unset_active()
