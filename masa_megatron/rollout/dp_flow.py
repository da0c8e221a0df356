"""Data-parallel flow for engines that live outside the trainer (SGLang).

Under Megatron, the ranks of one model-parallel group (TP x PP x CP) hold one copy of the model
and train on the same data-parallel shard, so they need the same rollouts. Each data-parallel
rank's requests arrive already grouped (the samples of one problem in one request, the requests
of one problem next to each other), and they stay as they are: nothing is split or reordered.

    DP group d:  first rank of its model-parallel group --requests--> engine (HTTP)
                 first rank --results as tensors, gloo--> the other TP/PP ranks of d

While the first rank waits for the engine, its peers wait on the group's gloo twin
(`parallel.run_on_model_parallel_source`): a CPU thread on a socket, no NCCL collective on a GPU
that SGLang decodes on. The results travel as four flat tensors (`encode_results`), not as a
pickled list of millions of Python ints:

    shape    int64  [R + 1 + 3C]: R, then per request (prompt_tokens, weight_version, n_completions,
                    id length or -1 for None), then per completion (tokens, log-probs, reason length)
    tokens   int64  every completion's token ids, concatenated
    logprobs float64  every completion's log-probs, concatenated (the engine's values, exactly)
    text     uint8  request ids and finish reasons, UTF-8, concatenated

Every rank of the group calls `generate_in_model_parallel_group` with its own copy of the
requests (only the first rank's are used); all return equal results, or raise the first rank's
error. Without torch.distributed or Megatron's groups, it simply calls the engine.
"""
from __future__ import annotations

from array import array
from typing import Callable, TypeVar

import torch

from masa_megatron.parallel import run_on_model_parallel_source
from masa_megatron.rollout.base import Completion, GenerationResult

T = TypeVar("T")


def generate_in_model_parallel_group(generate: Callable[[T], list[GenerationResult]],
                                     requests: T) -> list[GenerationResult]:
    """`generate(requests)` on the group's first rank; its result (or its error) on all ranks."""
    return run_on_model_parallel_source(lambda: generate(requests), encode_results,
                                        decode_results)


def encode_results(results: list[GenerationResult]) -> list[torch.Tensor]:
    """The results as the flat tensors of the module docstring."""
    shape, tokens, logprobs, text = array("q", [len(results)]), array("q"), array("d"), bytearray()
    completions = array("q")
    for r in results:
        rid = None if r.request_id is None else r.request_id.encode()
        shape.extend((r.prompt_tokens, r.weight_version, len(r.completions),
                      -1 if rid is None else len(rid)))
        text += rid or b""
        for c in r.completions:
            reason = c.finish_reason.encode()
            completions.extend((len(c.token_ids), len(c.logprobs), len(reason)))
            tokens.extend(c.token_ids)
            logprobs.extend(c.logprobs)
            text += reason
    shape.extend(completions)
    return [_tensor(shape, torch.int64), _tensor(tokens, torch.int64),
            _tensor(logprobs, torch.float64), _tensor(text, torch.uint8)]


def _tensor(buffer, dtype: torch.dtype) -> torch.Tensor:
    """A tensor holding a copy of `buffer` (array.array or bytearray; fast for millions)."""
    return torch.frombuffer(buffer, dtype=dtype).clone() if len(buffer) else \
        torch.zeros(0, dtype=dtype)


def decode_results(tensors: list[torch.Tensor]) -> list[GenerationResult]:
    """Inverse of `encode_results`."""
    shape, tokens, logprobs = (t.numpy().tolist() for t in tensors[:3])
    text = tensors[3].numpy().tobytes()
    n_requests, at = shape[0], 1 + 4 * shape[0]
    tok = lp = ch = 0
    results = []
    for i in range(n_requests):
        prompt_tokens, version, n_completions, id_len = shape[1 + 4 * i: 5 + 4 * i]
        rid = None if id_len < 0 else text[ch:ch + id_len].decode()
        ch += max(id_len, 0)
        completions = []
        for _ in range(n_completions):
            n_tok, n_lp, n_reason = shape[at:at + 3]
            at += 3
            completions.append(Completion(tokens[tok:tok + n_tok], logprobs[lp:lp + n_lp],
                                          text[ch:ch + n_reason].decode()))
            tok, lp, ch = tok + n_tok, lp + n_lp, ch + n_reason
        results.append(GenerationResult(rid, prompt_tokens, completions, weight_version=version))
    return results
