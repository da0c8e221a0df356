"""Crash-safe checkpoint directories: write to a temporary folder, rename when complete.

Layout under the checkpoint root:

    step_000010/            a complete checkpoint (renamed into place only after every rank wrote)
        model/              Megatron dist_checkpointing (model + optimizer), any TP/PP can load it
        trainer/rank_*.pt   per-rank trainer state (RNG states of every generator, the rank's
                            data-parallel rank and its behaviour-cloning buffer)
        trainer/common.pt   step, sampler position, scheduler, counters (rank 0)
        trainer/meta_head.pt  the meta-head and its optimiser (first rank of the last stage)
        config.yaml         the resolved experiment config
        COMPLETE            marker, written last inside the folder before the rename
    latest                  text file naming the newest complete checkpoint, updated last
    .tmp-step_000012/       a write in progress (or a crash mid-write): never loaded, removed later

`resume=auto` takes `latest` (or, if it is missing or stale, the newest folder with COMPLETE).
A crash at any point leaves the previous complete checkpoint and `latest` intact. A checkpoint
that fails `verify` (a truncated shard: check_saved_checkpoint) stops the resume naming it, or,
with `fallback_on_corrupt`, is set aside as `.damaged-step_N/` and the previous one is taken.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from masa_megatron.errors import UserError

COMPLETE = "COMPLETE"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_saved_checkpoint(folder: Path) -> None:
    """UserError naming `folder` and the damaged file: a model/optimizer shard shorter than its
    index says, or a trainer state file that is not a complete torch archive."""
    import zipfile

    from masa_megatron.model.checkpoint_io import check_dist_checkpoint
    check_dist_checkpoint(folder / "model", owner=folder)
    for state in sorted((folder / "trainer").glob("*.pt")):
        if not zipfile.is_zipfile(state):
            raise UserError(f"checkpoint {folder} is damaged: {state.relative_to(folder)} is "
                            f"truncated or not a torch archive")


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, log: Callable[[str], None] = print,
                 verify: Optional[Callable[[Path], None]] = None):
        """`verify(folder)` raises UserError when a complete checkpoint is damaged."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.log = log
        self.verify = verify

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Optional[Path]:
        marker = self.root / LATEST
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            if (named / COMPLETE).is_file():
                return named
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def resolve(self, resume: str, fallback_on_corrupt: bool = False) -> Optional[Path]:
        """`auto` -> newest complete (or None), `none` -> None, else an explicit folder.
        Collective when `fallback_on_corrupt` sets a damaged checkpoint aside (rank 0 moves it)."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise UserError(f"checkpoint.resume: '{resume}' is not a complete checkpoint "
                                f"(no {COMPLETE} marker)")
            if self.verify is not None:
                self.verify(path)
            return path
        found = self.latest()
        partial = sorted(self.root.glob(".tmp-step_*")) if self.root.is_dir() else []
        if partial:
            self.log(f"checkpoint: ignoring incomplete write(s) "
                     f"{', '.join(p.name for p in partial)} (interrupted while saving)")
        damaged = []
        while found is not None and self.verify is not None:
            try:
                self.verify(found)
                break
            except UserError as err:
                step = int(found.name.split("_")[1])
                earlier = [p for p in self.complete_checkpoints()
                           if int(p.name.split("_")[1]) < step and p not in damaged]
                previous = earlier[-1] if earlier else None
                if not fallback_on_corrupt:
                    hint = (f"set checkpoint.fallback_on_corrupt=true to resume from "
                            f"{previous.name}" if previous else
                            "no earlier complete checkpoint: set checkpoint.resume=none to "
                            "start afresh")
                    raise UserError(f"{err}; {hint}") from None
                if previous is None:
                    raise UserError(f"{err}; no earlier complete checkpoint to fall back to: "
                                    f"set checkpoint.resume=none to start afresh") from None
                self.log(f"checkpoint: {err}; falling back to {previous.name} "
                         f"(checkpoint.fallback_on_corrupt)")
                damaged.append(found)
                found = previous
        if damaged:
            self._set_aside(damaged, found)
        if found is not None:
            self.log(f"checkpoint: resuming from {found}")
        return found

    def _set_aside(self, damaged: list[Path], resumed: Path) -> None:
        """Rank 0 renames damaged checkpoints to .damaged-step_N (kept for inspection, out of
        resume and retention) and points `latest` at the one resumed."""
        rank, _ = _rank_and_world()
        _barrier()
        if rank == 0:
            for path in damaged:
                aside = path.with_name(f".damaged-{path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            _fsync_write(self.root / LATEST, resumed.name + "\n")
        _barrier()

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: every rank calls it; `write(tmp_dir)` writes this rank's part."""
        rank, _ = _rank_and_world()
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        write(tmp)
        _barrier()
        _crash_point(step)
        if rank == 0:
            _fsync_write(tmp / COMPLETE, f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_write(self.root / LATEST, final.name + "\n")
            self._retain()
        _barrier()
        return final

    def _retain(self) -> None:
        complete = self.complete_checkpoints()
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        newest = complete[-1].name if complete else None
        for stale in self.root.glob(".tmp-step_*"):
            if newest is None or stale.name != f".tmp-{newest}":
                shutil.rmtree(stale, ignore_errors=True)


def _crash_point(step: int) -> None:
    """Fault injection for the crash-safety tests: MASA_TEST_CRASH_IN_SAVE=<step> SIGKILLs every
    rank after the checkpoint's data is written and before it is marked complete."""
    if os.environ.get("MASA_TEST_CRASH_IN_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """Every generator a step draws from: python, numpy, torch CPU (and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        from megatron.core import tensor_parallel
        tracker = tensor_parallel.get_cuda_rng_tracker()
        state["megatron_tracker"] = tracker.get_states()
    except Exception:  # tracker not initialised (single-process tests)
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core import tensor_parallel
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def save_trainer_state(folder: Path, common: dict, rank_state: Optional[dict] = None) -> None:
    """Per-rank RNG state and `rank_state`, and (rank 0) the shared trainer state."""
    rank, world = _rank_and_world()
    out = folder / "trainer"
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"rng": rng_state(), "world_size": world, **(rank_state or {})},
               out / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(common, out / "common.pt")


def load_trainer_state(folder: Path) -> dict:
    """Restores this rank's RNG (when the world size matches) and returns the shared state."""
    rank, world = _rank_and_world()
    common = torch.load(folder / "trainer" / "common.pt", weights_only=False)
    mine = folder / "trainer" / f"rank_{rank:05d}.pt"
    if mine.is_file():
        saved = torch.load(mine, weights_only=False)
        if saved["world_size"] == world:
            set_rng_state(saved["rng"])
    return common


def load_data_parallel_list(folder: Path, key: str, dp_rank: int, dp_size: int) -> list:
    """A list each rank saved under `key` in its `rank_state` with its "dp_rank" and "dp_size"
    (the ranks of one model-parallel group hold the same list). Same data-parallel size: the list
    of this data-parallel rank. Another size: the saved data-parallel ranks' lists, concatenated
    in rank order, dealt round-robin over the new ranks. [] where none was saved."""
    rank, _ = _rank_and_world()
    mine = folder / "trainer" / f"rank_{rank:05d}.pt"
    if mine.is_file():
        saved = torch.load(mine, weights_only=False)
        if saved.get("dp_size") == dp_size and saved.get("dp_rank") == dp_rank:
            return list(saved.get(key, []))
    by_dp_rank, saved_size = {}, None
    for path in sorted((folder / "trainer").glob("rank_*.pt")):
        saved = torch.load(path, weights_only=False)
        if "dp_rank" in saved:
            saved_size = saved["dp_size"]
            by_dp_rank.setdefault(saved["dp_rank"], list(saved.get(key, [])))
    if saved_size == dp_size:
        return by_dp_rank.get(dp_rank, [])
    merged = [x for r in sorted(by_dp_rank) for x in by_dp_rank[r]]
    return merged[dp_rank::dp_size]
