"""Load and export of a ~100M-parameter random Llama: wall time and peak RSS per rank.

Layouts: 1 rank (TP=1) and 2 ranks (TP=2, torchrun, gloo). Each rank reports the bytes of the
parameters it owns, its RSS before building the model (the interpreter baseline: Python, torch,
Megatron), and its peak RSS during the load and during the export (the kernel's high-water mark,
reset before each phase through /proc/self/clear_refs). Target:
peak - baseline <= 1.5 x owned bytes.

    python benchmarks/model_load_export.py            # table + benchmarks/results/model_load_export.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).parent / "results" / "model_load_export.json"
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64,
             max_position_embeddings=2048)
TARGET = 1.5


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def worker(args) -> None:
    """One rank: build, load the HF checkpoint, export it; write its numbers as JSON."""
    import torch

    from masa_megatron.config import ModelConfig, ParallelConfig
    from masa_megatron.model import build_gpt_model, export_hf_checkpoint, load_hf_weights
    from masa_megatron.parallel import destroy_parallel, init_parallel

    layout = init_parallel(ParallelConfig(tensor_model_parallel_size=args.tp))
    import megatron.core.models.gpt  # noqa: F401  (counted in the baseline)

    baseline_kb = _status_kb("VmRSS")
    model = build_gpt_model(args.hf, ModelConfig(hf_path=str(args.hf)))
    owned = sum(p.numel() * p.element_size() for p in model.parameters())
    _reset_peak()
    start = time.perf_counter()
    load_hf_weights(model, args.hf)
    load_s = time.perf_counter() - start
    load_peak_kb = _status_kb("VmHWM")
    torch.distributed.barrier()
    _reset_peak()
    start = time.perf_counter()
    export_hf_checkpoint(model, args.export_dir, dtype="fp32", max_shard_bytes=200 << 20)
    export_s = time.perf_counter() - start
    export_peak_kb = _status_kb("VmHWM")
    mb = 1 << 20
    report = {
        "layout": f"TP={args.tp}", "rank": layout.rank, "owned_mb": owned / mb,
        "baseline_rss_mb": baseline_kb * 1024 / mb,
        "load_s": load_s, "load_peak_rss_mb": load_peak_kb * 1024 / mb,
        "load_ratio": (load_peak_kb - baseline_kb) * 1024 / owned,
        "export_s": export_s, "export_peak_rss_mb": export_peak_kb * 1024 / mb,
        "export_ratio": (export_peak_kb - baseline_kb) * 1024 / owned,
    }
    (args.report_dir / f"tp{args.tp}_rank{layout.rank}.json").write_text(json.dumps(report))
    destroy_parallel()


def _launch(script: Path, hf: Path, work: Path, tp: int) -> None:
    common = [str(script), "--worker", "--tp", str(tp), "--hf", str(hf),
              "--export-dir", str(work / f"export_tp{tp}"), "--report-dir", str(work)]
    if tp == 1:
        cmd = [sys.executable] + common
    else:
        from masa_megatron.ports import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}",
               f"--master_port={free_port()}"] + common
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    subprocess.run(cmd, check=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=RESULT, help="JSON output path")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from masa_megatron.model.tiny import make_tiny_hf_model

    with tempfile.TemporaryDirectory(prefix="masa_bench_") as tmp:
        work = Path(tmp)
        hf = work / "hf"
        model = make_tiny_hf_model(hf, "llama", seed=0, max_shard_size="200MB", **MODEL)
        params = sum(p.numel() for p in model.parameters())
        del model
        for tp in (1, 2):
            _launch(Path(__file__).resolve(), hf, work, tp)
        rows = [json.loads(p.read_text()) for p in sorted(work.glob("tp*_rank*.json"))]
    header = (f"{'layout':7} {'rank':>4} {'owned MB':>9} {'base MB':>8} {'load s':>7} "
              f"{'load peak':>10} {'ratio':>6} {'export s':>9} {'exp peak':>9} {'ratio':>6}")
    print(f"model: {params / 1e6:.1f}M parameters (fp32), target ratio <= {TARGET}")
    print(header)
    for r in rows:
        print(f"{r['layout']:7} {r['rank']:>4} {r['owned_mb']:9.1f} {r['baseline_rss_mb']:8.1f} "
              f"{r['load_s']:7.2f} {r['load_peak_rss_mb']:10.1f} {r['load_ratio']:6.2f} "
              f"{r['export_s']:9.2f} {r['export_peak_rss_mb']:9.1f} {r['export_ratio']:6.2f}")
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps({
        "benchmark": "model_load_export", "parameters": params, "model": MODEL,
        "ratio": "(peak RSS - baseline RSS) / owned parameter bytes", "target_ratio": TARGET,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": os.getloadavg()[0]},
        "ranks": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.result}")
    return 0 if all(max(r["load_ratio"], r["export_ratio"]) <= TARGET for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
