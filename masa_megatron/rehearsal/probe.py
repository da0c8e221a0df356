"""`masa train` with observers, for the rehearsal: `python -m masa_megatron.rehearsal.probe
train --recipe R key=value ...` (under torchrun) runs `masa_megatron.cli.main` unchanged after
wrapping four functions of the real path, which keep working as before and additionally write
what they saw to $MASA_REHEARSAL_PROBE (a folder; nothing is observed without it):

- `loop.run_step`: the step number, and (rank 0) the step's metrics -> steps.jsonl;
- `Actor.compute_old_logprobs`: per rank and step, max |trainer old log-prob - rollout log-prob|
  over the batch's response tokens, how many response tokens are ids the tokenizer cannot
  produce (>= its size, read from probe.json) and whether their log-probs are finite
  -> logprobs-<rank>.jsonl;
- `SGLangEngine.update_weights` (a collective): after every sync, the sha256 of the trainer's
  full HF weights (every stage, as the sync sends them) and (rank 0) of every server TP rank's
  served weights (GET /standin/checksums) -> syncs.jsonl;
- `SGLangEngine.shutdown`: before the servers stop, (rank 0) each server's request log
  (GET /standin/stats of a stand-in started with --record), tensor payloads dropped
  -> calls-<server>.jsonl, one line per run;
and a forward pre-hook on every Megatron tensor-parallel linear layer records the sequence
length it gets and whether it runs sequence-parallel -> linear-<rank>.json.
Checksums are the stand-in's own (`tests.sglang_standin.weights.hf_checksum`).
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

ENV = "MASA_REHEARSAL_PROBE"
_STATE = {"step": None, "linear": {}}


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _append(name: str, record: dict) -> None:
    with open(Path(os.environ[ENV]) / name, "a") as f:
        f.write(json.dumps(record) + "\n")


def _settings() -> dict:
    return json.loads((Path(os.environ[ENV]) / "probe.json").read_text())


def _observe_steps(loop) -> None:
    run_step = loop.run_step

    @functools.wraps(run_step)
    def observed(parts, step):
        _STATE["step"] = step
        if not _STATE["linear"]:
            _hook_linear_layers(parts.actor.model_chunks)
        metrics = run_step(parts, step)
        if _rank() == 0:
            _append("steps.jsonl", {"step": step, "metrics": {
                k: v for k, v in metrics.items() if isinstance(v, (int, float))}})
        return metrics

    loop.run_step = observed


def _observe_logprobs(actor_cls) -> None:
    compute = actor_cls.compute_old_logprobs

    @functools.wraps(compute)
    def observed(self, batch):
        import torch

        out = compute(self, batch)
        first_oov = _settings()["tokenizer_size"]
        gap, oov, oov_finite, tokens = 0.0, 0, True, 0
        for ids, old, rollout in zip(batch.response_ids, batch.old_logprobs,
                                     batch.rollout_logprobs or [None] * len(batch)):
            ids = torch.as_tensor(ids)
            tokens += len(ids)
            outside = ids >= first_oov
            oov += int(outside.sum())
            oov_finite &= bool(torch.isfinite(old[outside]).all())
            if rollout is not None and len(ids):
                gap = max(gap, float((old - rollout).abs().max()))
        _append(f"logprobs-{_rank()}.jsonl", {"step": _STATE["step"], "max_gap": gap,
                                               "tokens": tokens, "oov_tokens": oov,
                                               "oov_logprobs_finite": oov_finite,
                                               "has_rollout_logprobs":
                                                   batch.rollout_logprobs is not None})
        return out

    actor_cls.compute_old_logprobs = observed


def trainer_checksum(model_chunks) -> str:
    """Collective: sha256 of the trainer's full HF tensors (all stages), as the sync sends them."""
    from masa_megatron.rollout.weight_sync.tensor import all_stage_buckets
    from tests.sglang_standin.weights import hf_checksum

    return hf_checksum({name: t.clone() for bucket in all_stage_buckets(model_chunks, 1 << 24)
                        for name, t in bucket})


def _observe_engine(engine_cls) -> None:
    update, shutdown = engine_cls.update_weights, engine_cls.shutdown

    @functools.wraps(update)
    def observed_update(self, model=None, path=None, *, version=None):
        out = update(self, model, path, version=version)
        chunks = model if model is not None else None
        trainer = trainer_checksum(chunks) if chunks is not None else None
        if _rank() == 0:
            served = [self.http.call(url, "/standin/checksums", method="GET").body
                      for url in self.server_urls]
            _append("syncs.jsonl", {"step": _STATE["step"], "version": out, "trainer": trainer,
                                    "servers": served})
        return out

    @functools.wraps(shutdown)
    def observed_shutdown(self):
        if _rank() == 0 and getattr(self, "_alive", False):
            for i, url in enumerate(getattr(self, "server_urls", [])):
                try:
                    stats = self.http.call(url, "/standin/stats", method="GET").body
                except Exception as err:  # a dead server: the check reports the missing log
                    stats = {"error": f"{type(err).__name__}: {err}"}
                _append(f"calls-{i}.jsonl", _summary(stats))
        return shutdown(self)

    engine_cls.update_weights, engine_cls.shutdown = observed_update, observed_shutdown


def _summary(stats: dict) -> dict:
    """The request log without tensor payloads: [path, memory tags or None] in arrival order."""
    calls = [[path, (body or {}).get("tags") if isinstance(body, dict) else None]
             for _method, path, body in stats.get("bodies", [])]
    return {"calls": calls, "error": stats.get("error"),
            "recorded": "bodies" in stats}


def _hook_linear_layers(model_chunks) -> None:
    """Record (sequence length of the input, sequence_parallel) of every TP linear layer."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    seen = _STATE["linear"]
    seen.setdefault("shapes", {})

    def hook(module, args):
        key = f"{type(module).__name__}|sp={bool(module.sequence_parallel)}|" \
              f"in_sp={isinstance(module, ColumnParallelLinear) and module.sequence_parallel}"
        seen["shapes"].setdefault(key, set()).add(int(args[0].shape[0]))

    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.register_forward_pre_hook(hook)


def _write_linear() -> None:
    shapes = _STATE["linear"].get("shapes")
    if shapes is not None:
        Path(os.environ[ENV], f"linear-{_rank()}.json").write_text(json.dumps(
            {k: sorted(v) for k, v in shapes.items()}))


def install() -> None:
    """Wrap the observed functions (module docstring); a no-op without $MASA_REHEARSAL_PROBE."""
    if not os.environ.get(ENV):
        return
    from masa_megatron.rollout.sglang import SGLangEngine
    from masa_megatron.train import loop
    from masa_megatron.train.actor import Actor

    _observe_steps(loop)
    _observe_logprobs(Actor)
    _observe_engine(SGLangEngine)


def main(argv: list[str] | None = None) -> int:
    from masa_megatron.cli import main as masa_main

    install()
    try:
        return masa_main(argv)
    finally:
        if os.environ.get(ENV):
            _write_linear()


if __name__ == "__main__":
    sys.exit(main())
