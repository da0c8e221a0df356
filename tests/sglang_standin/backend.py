"""What stands behind the stand-in server's routes.

`ModelBackend`: a real Megatron GPTModel (TP=PP=1, CPU, fp32) loaded from an HF folder with the
project's loader, generating with the project's EmbeddedEngine, so the outputs are real and the
weight updates visibly change them. HF-named tensors (from /update_weights_from_tensor and
/update_weights_from_distributed) are copied into the Megatron parameters with the model
registry's rules; q/k/v or gate/up parts that arrive in different buckets wait until all parts
are there.

`EchoBackend`: no model, no torch import at start-up; answers with a deterministic token pattern.
For the fault-injection and launcher tests, where start-up time matters and outputs do not.
`TimedBackend`: echo tokens that take a stated time per token (scheduling benchmarks).

Both are called from one worker thread only (the server serialises model access).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

_MASK64 = (1 << 64) - 1
_MIX = 0xBF58476D1CE4E5B9
_MIX_INV = pow(_MIX, -1, 1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15


def _unshift31(y: int) -> int:
    """Inverse of h ^= h >> 31 on 64 bits."""
    return y ^ (y >> 31) ^ (y >> 62)


def row_seed_to_request_seed(seed: int) -> int:
    """x with masa's mix_seed(x, 0) == seed: lets SGLang's per-request sampling_seed be the row
    seed of the embedded engine (which derives sample j's seed as mix_seed(request seed, j))."""
    h = seed & _MASK64
    h = ((_unshift31(h) * _MIX_INV) & _MASK64) ^ 0        # undo the round that mixed in j = 0
    h = (_unshift31(h) * _MIX_INV) & _MASK64               # undo the round that mixed in x
    return h ^ _GOLDEN


@dataclass
class Item:
    """One /generate sequence: prompt, sampling parameters (stand-in schema), request id."""
    rid: str
    input_ids: list[int]
    params: Any                     # schemas.SamplingParams
    seq: int = 0                    # arrival order (abort_all aborts everything before it)
    index: int = 0                  # sample j of the request (seeded splits: rid "...-s<j>")


def eos_ids(folder: str) -> list[int]:
    """EOS ids as SGLang reads them without a tokenizer: config.json, then generation_config."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = Path(folder) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            for v in (value if isinstance(value, list) else [value]):
                if v is not None and int(v) not in ids:
                    ids.append(int(v))
    return ids


class EchoBackend:
    """Token t+1, t+2, ... after the last prompt token (mod vocab), log-prob -1."""

    def __init__(self, model_path: Optional[str] = None, vocab_size: int = 1000,
                 context_length: int = 4096):
        self.vocab_size, self.context_length = vocab_size, context_length
        self.weight_version = "default"

    def generate(self, items: list[Item]) -> list[tuple[list[int], list[float], dict]]:
        out = []
        for item in items:
            n = item.params.max_new_tokens
            start = item.input_ids[-1] if item.input_ids else 0
            ids = [(start + k + 1) % self.vocab_size for k in range(n)]
            out.append((ids, [-1.0] * n, {"type": "length", "length": n}))
        return out

    def load_from_disk(self, path: str) -> None:
        if not Path(path).is_dir():
            raise FileNotFoundError(path)

    def load_tensors(self, named: list) -> None:
        pass

    def weights_by_name(self, name: str, truncate: int) -> list:
        return [0.0] * truncate

    def missing_parts(self) -> list[str]:
        return []

    def hf_tensors(self) -> dict:
        return {}

    def poison(self) -> list[str]:
        return []


class TimedBackend(EchoBackend):
    """Echo tokens that take time: the server sleeps prefill_s + length x token_time_s per
    running sequence (server.py states the time model). A sequence's length is max_new_tokens,
    or, for a prompt [LENGTHS_MARKER, l_0, l_1, ...], min(max_new_tokens, l_j) for sample j (a
    benchmark's sampled lengths)."""
    LENGTHS_MARKER = 999

    def __init__(self, model_path: Optional[str] = None, vocab_size: int = 1000,
                 context_length: int = 4096, token_time_s: float = 0.001, prefill_s: float = 0.0):
        super().__init__(model_path, vocab_size, context_length)
        self.token_time_s, self.prefill_s = token_time_s, prefill_s

    def length(self, item: Item) -> int:
        ids, cap = item.input_ids, item.params.max_new_tokens
        if ids and ids[0] == self.LENGTHS_MARKER and len(ids) > 1 + item.index:
            return max(1, min(cap, ids[1 + item.index]))
        return cap

    def generate(self, items: list[Item]) -> list[tuple[list[int], list[float], dict]]:
        out = []
        for item, (ids, lps, _) in zip(items, super().generate(items)):
            n = self.length(item)
            reason = {"type": "length", "length": n} if n == item.params.max_new_tokens \
                else {"type": "stop", "matched": ids[n - 1]}
            out.append((ids[:n], lps[:n], reason))
        return out


class ModelBackend:
    """A tiny Megatron model on CPU behind the EmbeddedEngine."""

    def __init__(self, model_path: str, seed: int = 0, context_length: Optional[int] = None):
        import torch

        from masa_megatron.config import ModelConfig, ParallelConfig
        from masa_megatron.model import build_gpt_model, load_hf_weights
        from masa_megatron.model.hf_config import decoder_shape
        from masa_megatron.parallel import init_parallel
        from masa_megatron.rollout.embedded import EmbeddedEngine

        torch.set_num_threads(1)
        init_parallel(ParallelConfig(), seed=seed)
        self.model_path = model_path
        self.model = build_gpt_model(model_path, ModelConfig(hf_path=model_path))
        load_hf_weights(self.model, model_path)
        self.shape = decoder_shape(self.model.masa_hf_config)
        self.vocab_size = self.shape.vocab_size
        self.context_length = context_length or self.shape.max_position_embeddings
        self.engine = EmbeddedEngine(self.model, vocab_size=self.vocab_size,
                                     eos_token_ids=eos_ids(model_path), seed=seed,
                                     max_context_length=self.context_length)
        self._pending: dict[str, Any] = {}
        self._rules = self._index_rules()

    def _index_rules(self) -> dict[str, tuple]:
        from masa_megatron.model.hf_io import mapped_parameters

        index = {}
        for name, param, rule, hf_names in mapped_parameters(self.model):
            if self.shape.tie_embeddings and name == "output_layer.weight":
                continue
            for hf_name in hf_names:
                index[hf_name] = (param, rule, hf_names)
        return index

    # ------------------------------------------------------------ generation
    def generate(self, items: list[Item]) -> list[tuple[list[int], list[float], dict]]:
        from masa_megatron.rollout.base import GenerationRequest, SamplingParams

        requests = []
        for item in items:
            p = item.params
            seed = None if p.sampling_seed is None else row_seed_to_request_seed(p.sampling_seed)
            requests.append(GenerationRequest(item.input_ids, SamplingParams(
                max_new_tokens=p.max_new_tokens, temperature=max(0.0, p.temperature),
                top_p=p.top_p, top_k=p.top_k, stop_token_ids=p.stop_token_ids or (),
                ignore_eos=p.ignore_eos, n=1, seed=seed), item.rid))
        out = []
        for result in self.engine.generate(requests):
            c = result.completions[0]
            if c.finish_reason == "stop":
                reason = {"type": "stop", "matched": c.token_ids[-1]}
            elif c.finish_reason == "length":
                reason = {"type": "length", "length": len(c.token_ids)}
            else:
                reason = {"type": "abort", "message": "aborted by the engine"}
            out.append((c.token_ids, c.logprobs, reason))
        return out

    # ------------------------------------------------------------ weights
    def load_from_disk(self, path: str) -> None:
        from masa_megatron.model import load_hf_weights

        load_hf_weights(self.model, path)
        self._pending.clear()

    def load_tensors(self, named: list) -> None:
        """Copy HF tensors into the parameters; fused parameters once all parts arrived."""
        import torch

        from masa_megatron.model.sharding import shard_pieces, shard_views

        for name, tensor in named:
            if name not in self._rules:
                raise KeyError(f"no parameter for HF tensor {name!r}")
            self._pending[name] = tensor.detach()
        for name in list(self._pending):
            if name not in self._pending:
                continue
            param, rule, hf_names = self._rules[name]
            if not all(n in self._pending for n in hf_names):
                continue
            with torch.no_grad():
                param.zero_()            # vocabulary padding rows stay zero
                views = shard_views(rule, param.data, 0, self.shape)
                for piece, view in zip(shard_pieces(rule, 0, 1, param.shape, self.shape), views):
                    hf = self._pending[hf_names[piece.hf_index]]
                    span = slice(piece.start, piece.stop)
                    part = hf[span] if piece.axis == 0 else hf[:, span]
                    view.copy_(part.reshape(view.shape).to(param.dtype))
            for n in hf_names:
                self._pending.pop(n, None)
        for name, tensor in self._pending.items():      # parts waiting for a later bucket:
            self._pending[name] = tensor.clone()        # the sender's memory goes away

    def missing_parts(self) -> list[str]:
        """HF tensors received whose fused partners have not arrived (should be empty)."""
        return sorted(self._pending)

    def _full(self, key: str):
        from masa_megatron.rollout.weight_sync.buckets import merge_tp_shards

        param, rule, hf_names = self._rules[key]
        return merge_tp_shards(rule, [param.detach()], self.shape)[hf_names.index(key)]

    def weights_by_name(self, name: str, truncate: int) -> list:
        key = "model.embed_tokens.weight" if (name == "lm_head.weight"
                                              and self.shape.tie_embeddings) else name
        if key not in self._rules:
            raise KeyError(f"no parameter named {name!r}")
        return self._full(key).float().tolist()[:truncate]

    def hf_tensors(self) -> dict:
        """Every served weight as the full HF tensor it was loaded from."""
        return {name: self._full(name) for name in self._rules}

    def poison(self) -> list[str]:
        """Fill every parameter with NaN (released memory); the HF names it covers."""
        import torch

        with torch.no_grad():
            for param in self.model.parameters():
                param.fill_(float("nan"))
        return sorted(self._rules)
