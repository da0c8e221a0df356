"""Holds the output-folder lock of DIR until killed, as a run would: `python -m
tests.support.lock_holder DIR [fork]` prints "locked" once it holds it; `fork` also leaves a
forked helper running (which must not keep the lock after the holder dies)."""
import os
import sys
import time

from masa_megatron.lifecycle import FolderLock

if __name__ == "__main__":
    with FolderLock(sys.argv[1], "trainer.output_dir"):
        if sys.argv[2:] == ["fork"] and os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        print("locked", flush=True)
        time.sleep(600)
