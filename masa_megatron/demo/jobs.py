"""Run the demo's training runs as parallel worker processes, with one combined status line.

On a small CPU one process per core, each with one torch thread, does about twice the work per
second of one process with two threads (the tiny model's matmuls do not scale across threads).
So `masa demo` starts up to `jobs` workers (`python -m masa_megatron.demo.jobs SPEC.json`), each
running one (mode, seed) through the real trainer, longest runs first. A worker's stdout and stderr
go to `<run dir>/log.txt`; the parent shows the latest progress line of each running worker, the
queue, and the peak total resident memory of the workers. A failed worker's log tail is printed
and named in the error; Ctrl-C or any failure stops every worker (no orphans).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from masa_megatron.errors import UserError


@dataclass
class RunSpec:
    """One training run of the demo, as handed to a worker process."""
    mode: str
    seed: int
    budget: dict
    hf_dir: str
    train_file: str
    eval_file: str
    run_dir: str
    threads: int = 1
    label: str = ""                  # run name prefix (default: the mode)
    overrides: dict = field(default_factory=dict)   # {"section.field": value} on the config

    @property
    def name(self) -> str:
        return f"{self.label or self.mode}-s{self.seed}"


def _rss_bytes(pid: int) -> int:
    """Resident memory of a process (0 when unknown or gone); Linux /proc only."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _last_progress(log: Path, name: str) -> str:
    """The newest `<name> step ...` line of a worker's log, shortened; '' before the first."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [x for x in tail.splitlines() if x.startswith(f"{name} step ")]
    if not lines:
        return ""
    fields = lines[-1].split(" | ")
    return " ".join([fields[0], *[f for f in fields[1:] if f.startswith(("ETA", "solution/acc"))]])


class _Status:
    """The parent's status line: rewritten in place on a terminal, every 30 s otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text[:200])
        elif force or now - self.last >= 30:
            self.stream.write(text + "\n")
        else:
            return
        self.last = now
        self.stream.flush()

    def done(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def run_specs(specs: list[RunSpec], jobs: int, log: Callable[[str], None] = print,
              poll_s: float = 1.0) -> dict:
    """Run every spec in worker processes, at most `jobs` at once, in the given order.

    Returns {name: {"wall_s": seconds, "cpu_s": CPU seconds the worker recorded,
    "peak_rss_total_bytes": ...}}; raises UserError naming
    every failed run (after the others finish) with the tail of its log."""
    queue, running, results, failed = list(specs), {}, {}, []
    status, peak_rss, started = _Status(), 0, time.monotonic()
    try:
        while queue or running:
            while queue and len(running) < jobs:
                spec = queue.pop(0)
                running[spec.name] = (spec, _start(spec), time.monotonic())
                log(f"demo: started {spec.name} ({spec.threads} thread(s)) -> {spec.run_dir}")
            time.sleep(poll_s)
            peak_rss = max(peak_rss, sum(_rss_bytes(p.pid) for _, p, _ in running.values()))
            for name, (spec, proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                wall = time.monotonic() - t0
                results[name] = {"wall_s": wall, "cpu_s": _worker_cpu_s(spec)}
                if proc.returncode != 0:
                    failed.append(spec)
                status.done(f"demo: {name} {'finished' if proc.returncode == 0 else 'FAILED'} "
                            f"in {wall:.0f} s")
            parts = [_last_progress(Path(s.run_dir) / "log.txt", n) or f"{n} starting"
                     for n, (s, _, _) in running.items()]
            parts.append(f"{len(queue)} queued, {time.monotonic() - started:.0f} s, "
                         f"peak RSS {peak_rss / 2**30:.2f} GiB")
            status.show(" | ".join(parts))
    finally:
        for _, proc, _ in running.values():   # interrupted or crashed: stop every worker
            proc.terminate()
        for _, proc, _ in running.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    for r in results.values():
        r["peak_rss_total_bytes"] = peak_rss
    if failed:
        failed.sort(key=specs.index)   # in the order given, not the order they ended
        tails = "\n".join(f"--- {s.name}: {Path(s.run_dir) / 'log.txt'} (last lines)\n"
                          + _tail(Path(s.run_dir) / "log.txt") for s in failed)
        raise UserError(f"demo: {len(failed)} run(s) failed: {', '.join(s.name for s in failed)}"
                        f"\n{tails}")
    return results


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every child process it has waited for."""
    import resource
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _worker_cpu_s(spec: RunSpec) -> float | None:
    """The CPU seconds a finished worker recorded (None if it died before recording them)."""
    try:
        return json.loads((Path(spec.run_dir) / "usage.json").read_text())["cpu_s"]
    except (OSError, ValueError, KeyError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start(spec: RunSpec) -> subprocess.Popen:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads)}
    with open(run_dir / "log.txt", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "masa_megatron.demo.jobs",
                                 str(run_dir / "spec.json")], stdout=out,
                                stderr=subprocess.STDOUT, env=env)


def worker(spec_path: str) -> int:
    """Worker entry point: train the run described by the spec file."""
    import torch

    from masa_megatron.config_checks import validate_static
    from masa_megatron.demo.run import DemoBudget, run_config, run_one
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    torch.set_num_threads(spec.threads)
    cfg = run_config(DemoBudget(**spec.budget), spec.mode, spec.seed, Path(spec.hf_dir),
                     Path(spec.train_file), Path(spec.eval_file), Path(spec.run_dir))
    cfg.name = spec.name
    for key, value in spec.overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    validate_static(cfg)
    wall_s = run_one(cfg)
    (Path(spec.run_dir) / "usage.json").write_text(json.dumps(
        {"wall_s": wall_s, "cpu_s": cpu_seconds(), "threads": torch.get_num_threads(),
         "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
