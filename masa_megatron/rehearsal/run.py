"""`masa rehearse RECIPE [--steps N]`: a recipe end to end on CPU at its real process topology.

1. Shrink (shrink.py): the recipe with a tiny model of its family, a small batch and short
   lengths; TP/PP/SP/DP, world size, colocation, weight sync, offload, method and checkpointing
   as the recipe has them.
2. Run 1: `torchrun --nproc-per-node=<world size> -m masa_megatron.rehearsal.probe train
   --recipe RECIPE overrides...` (gloo): `masa train` with observers (probe.py). The trainer
   starts the stand-in SGLang servers itself, as it starts real ones for a colocated recipe
   (rollout/sglang_launch.py, rollout.sglang_server_module = the stand-in, which runs the fp32
   embedded engine; its TP ranks are threads). N steps, a checkpoint at step N.
3. Run 2: the same command with trainer.steps = N + 1: resumes from step N, one more step,
   a checkpoint at N + 1.
4. Export: `masa convert mcore2hf` of the last checkpoint.
5. Checks (checks.py), one line each: PASS / FAIL / NOT-WIRED name detail. Exit code 1 on any
   FAIL.

The stand-in lives in tests/sglang_standin (a test double, strict about SGLang's API): the
rehearsal runs from a checkout of this repository and says so when it cannot import it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from masa_megatron.errors import UserError
from masa_megatron.ports import free_port
from masa_megatron.rehearsal import checks
from masa_megatron.rehearsal.probe import ENV as PROBE_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN_MODULE = "tests.sglang_standin.server"
ROUTER_MODULE = "tests.sglang_standin.router"
RUN_TIMEOUT_S = 1800


def _standin_available() -> None:
    import importlib.util

    sys.path.insert(0, str(REPO_ROOT)) if str(REPO_ROOT) not in sys.path else None
    if importlib.util.find_spec("tests.sglang_standin") is None:
        raise UserError(f"masa rehearse needs the SGLang stand-in of a repository checkout "
                        f"(tests/sglang_standin under {REPO_ROOT}); it is not there")


def plan(recipe: str, root: Path, steps: int, server_module: str = STANDIN_MODULE) -> dict:
    """The recipe, its tiny assets and the overrides of run 1 (no process is started)."""
    from recipes import get_recipe_info

    from masa_megatron.rehearsal.assets import ensure_assets
    from masa_megatron.rehearsal.shrink import model_vocab_size, shrink_overrides, tiny_shape

    info = get_recipe_info(recipe)
    cfg = info.build()
    if info.arch is None:
        raise UserError(f"recipe '{recipe}' brings no model to shrink (a CPU recipe): rehearse "
                        f"a GPU recipe, or run it with `masa train --recipe {recipe}`")
    if cfg.rollout.engine != "sglang":
        raise UserError(f"recipe '{recipe}': rollout.engine={cfg.rollout.engine}; the rehearsal "
                        f"stands in for SGLang servers only")
    shape = tiny_shape(info.arch, cfg)
    assets = ensure_assets(root / "assets", shape, lambda n: model_vocab_size(n, cfg))
    overrides = shrink_overrides(cfg, prompt_tokens=assets.prompt_tokens, steps=steps)
    overrides += [f"model.hf_path={assets.model_dir}",
                  f"data.train_files=[{assets.train_file}]",
                  f"trainer.output_dir={root / 'run'}",
                  f"rollout.sglang_server_module={server_module}",
                  "rollout.sglang_extra_args=[--record]",
                  f"rollout.sglang_base_port={free_port(count=cfg.rollout.sglang_num_servers + 1)}"]
    if cfg.data.eval_files:
        overrides.append(f"data.eval_files=[{assets.eval_file}]")
    return {"info": info, "cfg": cfg, "shape": shape, "assets": assets, "overrides": overrides}


def start_rollout_nodes(cfg, info, root: Path, base_port: int, server_module: str, env: dict):
    """A disaggregated recipe's servers and router, started as slurm/disaggregated.sbatch
    starts them on its rollout nodes (every node's GPUs in servers of rollout.sglang_tp,
    consecutive ports, then the router over them, before the trainer), here on this machine;
    -> (processes, the overrides that point the trainer at them)."""
    from recipes.qwen3 import GPUS_PER_NODE

    from masa_megatron.rollout.sglang_launch import (ServerOptions, launch_router,
                                                     launch_servers)

    r = cfg.rollout
    count = info.rollout_nodes * GPUS_PER_NODE // r.sglang_tp
    opts = ServerOptions(model_path=str(cfg.model.hf_path), tp=r.sglang_tp,
                         mem_fraction=r.sglang_mem_fraction, port=base_port, module=server_module,
                         seed=r.seed, extra_args=["--record"], env=env)
    procs = launch_servers(opts, count, health_timeout_s=r.sglang_health_timeout_s,
                           log_dir=str(root / "rollout-nodes"))
    urls = [p.url for p in procs]
    overrides = [f"rollout.sglang_urls=[{','.join(urls)}]", f"rollout.sglang_num_servers={count}"]
    if r.sglang_router:
        try:
            procs.append(launch_router(urls, host="127.0.0.1", port=base_port + count,
                                       health_timeout_s=r.sglang_health_timeout_s,
                                       log_dir=str(root / "rollout-nodes"),
                                       module=ROUTER_MODULE, env=env))
        except BaseException:
            for proc in procs:
                proc.stop()
            raise
        overrides.append(f"rollout.sglang_router_url={procs[-1].url}")
    return procs, overrides


def _torchrun(recipe: str, world: int, overrides: list[str], env: dict, log: Path) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", "-m", "masa_megatron.rehearsal.probe", "train",
           "--recipe", recipe, *overrides]
    # a file, not a pipe: torch_shm_manager daemons inherit it and outlive the ranks
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=RUN_TIMEOUT_S).returncode


def _env(probe: Path) -> dict:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, PROBE_ENV: str(probe), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(text[-lines:])


def _export(ckpt: Path, out: Path, log: Path, env: dict) -> int:
    cmd = [sys.executable, "-m", "masa_megatron.cli", "convert", "mcore2hf", "--ckpt", str(ckpt),
           "--out", str(out)]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=RUN_TIMEOUT_S).returncode


def rehearse(recipe: str, steps: int = 3, workdir: Optional[Path] = None, say=print,
             server_module: str = STANDIN_MODULE) -> list[checks.Check]:
    """Rehearse `recipe` in `workdir` (see the module docstring); returns the checks.
    `server_module`: what the trainer launches as each server (tests break it on purpose)."""
    _standin_available()
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    probe, log = root / "probe", root / "rehearsal.log"
    probe.mkdir(exist_ok=True)
    p = plan(recipe, root, steps, server_module)
    cfg, assets, overrides = p["cfg"], p["assets"], p["overrides"]
    (probe / "probe.json").write_text(json.dumps({"tokenizer_size": assets.tokenizer_size}))
    world = cfg.parallel.world_size
    say(f"rehearsing {recipe}: {world} ranks, TP {cfg.parallel.tensor_model_parallel_size}, "
        f"PP {cfg.parallel.pipeline_model_parallel_size}, SP {cfg.parallel.sequence_parallel}, "
        f"{cfg.rollout.sglang_num_servers} stand-in servers x TP {cfg.rollout.sglang_tp}, "
        f"sync {cfg.rollout.weight_sync}, offload {cfg.rollout.offload_train_state}; tiny "
        f"{p['shape']}; tokenizer {assets.tokenizer_size} < vocab {assets.model_vocab}; "
        f"log {log}")
    env, results, servers = _env(probe), [], []
    started = time.monotonic()
    try:
        if not cfg.rollout.colocate:
            from masa_megatron.config import load_config

            resolved = load_config(overrides=overrides, base=p["info"].build())
            servers, attach = start_rollout_nodes(resolved, p["info"], root,
                                                  resolved.rollout.sglang_base_port,
                                                  server_module, env)
            overrides += attach
        for name, extra in (("run", [f"trainer.steps={steps}"]),
                            ("resume", [f"trainer.steps={steps + 1}"])):
            code = _torchrun(recipe, world, overrides + extra, env, log)
            results.append(checks.Check(name, checks.PASS if code == 0 else checks.FAIL,
                                        f"exit code {code} after "
                                        f"{time.monotonic() - started:.0f} s" + (
                                            "" if code == 0 else f"; log tail:\n{_tail(log)}")))
            if code:
                break
    finally:
        for proc in servers:
            proc.stop()
    ckpt_root = root / "run" / "checkpoints"
    step_rows = checks.read_jsonl(probe / "steps.jsonl")
    step_metrics = {r["step"]: r["metrics"] for r in step_rows}
    results.append(checks.resumed_from([r["step"] for r in step_rows], steps, ckpt_root))
    syncs = checks.read_jsonl(probe / "syncs.jsonl")
    results.append(checks.weight_sync_checksums(syncs, expected_syncs=steps + 2))
    records = [r for f in sorted(probe.glob("logprobs-*.jsonl")) for r in checks.read_jsonl(f)]
    results.append(checks.logprob_gap(records, list(range(steps + 1))))
    results.append(checks.out_of_tokenizer_ids(records, step_metrics, assets.tokenizer_size,
                                               assets.model_vocab))
    logs = [r for f in sorted(probe.glob("calls-*.jsonl")) for r in checks.read_jsonl(f)]
    results.append(checks.handoff_order(logs, colocated=cfg.rollout.colocate))
    linear = [json.loads(f.read_text()) for f in sorted(probe.glob("linear-*.json"))]
    results.append(checks.sequence_parallel_layers(linear, cfg.parallel.sequence_parallel,
                                                   cfg.parallel.tensor_model_parallel_size))
    last = ckpt_root / f"step_{steps + 1:06d}" / "model"
    export = root / "export"
    code = _export(last, export, log, env) if last.is_dir() else None
    results.append(checks.exported(code, export, syncs, last))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="masa rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="a registered recipe (`masa recipes`)")
    parser.add_argument("--steps", type=int, default=3, help="RL steps before the resume (3)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep everything here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="masa-rehearse-"))
    started = time.monotonic()
    try:
        results = rehearse(args.recipe, args.steps, root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    for check in results:
        print(check.line(), flush=True)
    failed = [c.name for c in results if c.status == checks.FAIL]
    print(f"rehearsal of {args.recipe}: {len(results) - len(failed)} of {len(results)} checks "
          f"did not fail{'' if not failed else ', FAILED: ' + ', '.join(failed)} "
          f"({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0
