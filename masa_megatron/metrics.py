"""Metric sinks and a progress display.

A sink takes `(step, {name: number})` once per step. `JsonlSink` always runs (one JSON object per
line, flushed, so a crash loses at most the line being written); `TensorBoardSink` and `WandbSink`
run when configured and installed. `open_sinks(logging_cfg, out_dir)` builds the configured set;
only rank 0 should log.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Protocol


class MetricsSink(Protocol):
    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...
    def close(self) -> None: ...


def _plain(value):
    """Numbers (incl. 0-dim tensors / numpy scalars) -> float; non-finite kept as str for JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else str(value)
    return value


def _line(row: Mapping) -> str:
    return json.dumps({k: _plain(v) for k, v in row.items()}) + "\n"


class JsonlSink:
    """Appends `{"step": s, **metrics}` lines to `path`.

    `resume_step=s`: a run that continues from step s's checkpoint (0: a fresh start) first drops
    the rows it will write again (step > s; every row when s = 0), so the file holds one row per
    step. The file is rewritten atomically (temporary file, then rename)."""

    def __init__(self, path: str | Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep_through = resume_step if resume_step > 0 else -1
            rows = [r for r in read_jsonl(self.path) if r.get("step", 0) <= keep_through]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(_line(r) for r in rows), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._file.write(_line({"step": step, **metrics}))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, log_dir: str | Path, resume_step: Optional[int] = None):
        """`resume_step=s > 0` purges events after step s written by an earlier, crashed run."""
        from torch.utils.tensorboard import SummaryWriter
        purge = resume_step + 1 if resume_step else None
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    def __init__(self, project: str, name: str, config: Optional[dict] = None):
        import wandb  # optional dependency: pip install 'masa-megatron[wandb]'
        self._run = wandb.init(project=project, name=name, config=config or {})

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiSink:
    def __init__(self, sinks: Iterable[MetricsSink]):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(logging_cfg, out_dir: str | Path, run_name: str = "masa",
               config: Optional[dict] = None, resume_step: Optional[int] = None) -> MultiSink:
    """The sinks `logging_cfg` (a LoggingConfig) asks for, writing under `out_dir`;
    `resume_step`: the step the run starts from (see JsonlSink; W&B rows cannot be withdrawn)."""
    out_dir = Path(out_dir)
    sinks: list[MetricsSink] = []
    if logging_cfg.jsonl:
        sinks.append(JsonlSink(out_dir / "metrics.jsonl", resume_step))
    if logging_cfg.tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard", resume_step))
    if logging_cfg.wandb_project:
        sinks.append(WandbSink(logging_cfg.wandb_project, run_name, config))
    return MultiSink(sinks)


NON_FINITE = {str(x): x for x in (math.nan, math.inf, -math.inf)}   # as `_plain` writes them


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a metrics file, non-finite values ("nan", "inf", "-inf") as floats again; a
    truncated last line (crash mid-write) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.append({k: NON_FINITE.get(v, v) if isinstance(v, str) else v
                         for k, v in row.items()})
    return rows


class Progress:
    """One status line for a long loop: `label step/total rate ETA key=value ...`.

    Rewrites the line in place on a terminal, prints every `every` steps otherwise (logs, CI).
    """

    def __init__(self, total: int, label: str = "", start: int = 0, every: int = 1,
                 stream=None, enabled: bool = True):
        self.total, self.label, self.step = total, label, start
        self.every = max(1, every)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._t0, self._s0 = time.monotonic(), start

    def line(self, metrics: Mapping[str, float] = ()) -> str:
        done = self.step - self._s0
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = (self.total - self.step) / rate if rate else float("nan")
        parts = [f"{self.label} step {self.step}/{self.total}",
                 f"{rate:.2f} it/s" if rate >= 1 or not rate else f"{1 / rate:.1f} s/it",
                 f"ETA {_fmt_seconds(eta)}"]
        parts += [f"{k}={_fmt_value(v)}" for k, v in dict(metrics).items()]
        return " | ".join(p for p in parts if p.strip())

    def update(self, step: int, metrics: Mapping[str, float] = ()) -> None:
        self.step = step
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r\033[K" + self.line(metrics))
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step >= self.total:
            self.stream.write(self.line(metrics) + "\n")
        self.stream.flush()


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt_value(value) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def is_logging_rank() -> bool:
    """Rank 0 of the job (RANK env var when torch.distributed is not initialised yet)."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0")) == 0
