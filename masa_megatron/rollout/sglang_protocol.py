"""SGLang /generate bodies and answers (the protocol of rollout/sglang.py's docstring)."""
from __future__ import annotations

from typing import Any, Optional

from masa_megatron.rollout.base import (FINISH_ABORT, FINISH_REASONS, Completion,
                                        GenerationRequest)
from masa_megatron.rollout.sglang_launch import EngineError

_INT64 = 1 << 64


def _signed64(seed: int) -> int:
    seed %= _INT64
    return seed - _INT64 if seed >= 1 << 63 else seed


def generate_payloads(request: GenerationRequest, rid: str) -> list[dict]:
    """The /generate bodies of one request: one for n samples, or n one-sample seeded ones."""
    from masa_megatron.rollout.embedded import mix_seed

    p = request.sampling
    params = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
              "top_k": p.top_k if p.top_k > 0 else -1, "ignore_eos": p.ignore_eos, "n": p.n}
    if p.stop_token_ids:
        params["stop_token_ids"] = list(p.stop_token_ids)
    base = {"input_ids": [int(t) for t in request.prompt_token_ids], "return_logprob": True}
    if p.seed is None or p.greedy:
        return [dict(base, sampling_params=params, rid=rid)]
    return [dict(base, rid=f"{rid}-s{j}",
                 sampling_params=dict(params, n=1, sampling_seed=_signed64(mix_seed(p.seed, j))))
            for j in range(p.n)]


def parse_completions(body: Any, where: str) -> tuple[list[Completion], Optional[int]]:
    """Completions (and the weight version, when numeric) from a /generate answer."""
    items = body if isinstance(body, list) else [body]
    completions, version = [], None
    for item in items:
        try:
            ids = [int(t) for t in item["output_ids"]]
            meta = item["meta_info"]
            entries = meta.get("output_token_logprobs") or []
            logprobs = [float(e[0]) for e in entries]
            if [int(e[1]) for e in entries] != ids:
                raise ValueError("output_token_logprobs token ids differ from output_ids")
            reason = (meta.get("finish_reason") or {}).get("type") or FINISH_ABORT
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise EngineError(f"{where}: malformed /generate answer ({err}): "
                              f"{str(item)[:300]}") from None
        completions.append(Completion(ids, logprobs,
                                      reason if reason in FINISH_REASONS else FINISH_ABORT))
        try:
            version = int(meta.get("weight_version"))
        except (TypeError, ValueError):
            pass
    return completions, version
