"""SGLang's request schemas as the stand-in parses them, recorded from the pinned SGLang.

`sglang_schemas.json` holds, per request class the stand-in serves, every field SGLang's class
defines with its default (or "required"): python/sglang/srt/managers/io_struct.py
(GenerateReqInput, Update*/Init*/Destroy* weight requests, Begin/EndWeightUpdateReqInput,
Release/ResumeMemoryOccupationReqInput, AbortReq, GetWeightsByNameReqInput) and
python/sglang/srt/sampling/sampling_params.py (SamplingParams). It is written by
`tests/sglang_contract/side_check.py record` in the SGLang side environment (the version pinned
in setup.py), and tests/test_sglang_contract.py diffs it against those classes in CI, so the
stand-in cannot drift from the pinned version.

Strictness: a field SGLang does not define is an HTTP 400 here. SGLang itself rejects unknown
sampling parameters (SamplingParams(**params) raises) but its pydantic parsing of request bodies
ignores unknown top-level fields; the stand-in rejects both, so a misspelt field in our client
fails a test instead of being silently dropped by a real server (the contract test flags such
fields against SGLang's own classes too). A field SGLang defines but the stand-in does not
implement is a 400 unless it has its default value.
"""
from __future__ import annotations

import copy
import json
from dataclasses import MISSING, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

RECORDED = json.loads(Path(__file__).with_name("sglang_schemas.json").read_text())
SGLANG_VERSION = RECORDED["sglang_version"]


class BadRequest(ValueError):
    """Answered with HTTP 400 and this message."""


def _schema(name: str) -> type:
    """A dataclass with the recorded fields of SGLang's `name` (keyword-only)."""
    specs = []
    for fname, spec in sorted(RECORDED["schemas"][name].items()):
        if spec.get("required"):
            specs.append((fname, Any))
        else:
            default = spec["default"]
            specs.append((fname, Any, field(default_factory=lambda d=default: copy.deepcopy(d))))
    return make_dataclass(name, specs, kw_only=True)


SamplingParams = _schema("SamplingParams")
GenerateReqInput = _schema("GenerateReqInput")
UpdateWeightFromDiskReqInput = _schema("UpdateWeightFromDiskReqInput")
UpdateWeightsFromTensorReqInput = _schema("UpdateWeightsFromTensorReqInput")
InitWeightsUpdateGroupReqInput = _schema("InitWeightsUpdateGroupReqInput")
UpdateWeightsFromDistributedReqInput = _schema("UpdateWeightsFromDistributedReqInput")
DestroyWeightsUpdateGroupReqInput = _schema("DestroyWeightsUpdateGroupReqInput")
GetWeightsByNameReqInput = _schema("GetWeightsByNameReqInput")
ReleaseMemoryOccupationReqInput = _schema("ReleaseMemoryOccupationReqInput")
ResumeMemoryOccupationReqInput = _schema("ResumeMemoryOccupationReqInput")
AbortReq = _schema("AbortReq")
BeginWeightUpdateReqInput = _schema("BeginWeightUpdateReqInput")
EndWeightUpdateReqInput = _schema("EndWeightUpdateReqInput")


def parse(cls, body: Any, what: Optional[str] = None):
    """`cls(**body)` after checking that `body` is an object with only `cls`'s fields and all
    of its required ones."""
    what = what or cls.__name__
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: expected a JSON object, got {type(body).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise BadRequest(f"{what}: unknown field(s) {unknown} (not in sglang {SGLANG_VERSION} "
                         f"{cls.__name__})")
    missing = [n for n, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and n not in body]
    if missing:
        raise BadRequest(f"{what}: missing required field(s) {missing}")
    return cls(**body)


def unsupported(obj, implemented: Iterable[str], what: str) -> None:
    """400 for fields set away from SGLang's default that the stand-in does not implement."""
    recorded = RECORDED["schemas"][type(obj).__name__]
    bad = sorted(name for name, spec in recorded.items()
                 if name not in implemented and not spec.get("required")
                 and getattr(obj, name) != spec["default"])
    if bad:
        raise BadRequest(f"{what}: field(s) {bad} are valid SGLang fields the stand-in does not "
                         f"implement")


# what the stand-in implements; any other field must keep SGLang's default
SAMPLING_IMPLEMENTED = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                        "ignore_eos", "n", "sampling_seed", "skip_special_tokens",
                        "spaces_between_special_tokens", "no_stop_trim", "stream_interval")
GENERATE_IMPLEMENTED = ("input_ids", "sampling_params", "rid", "return_logprob",
                        "logprob_start_len", "return_text_in_logprobs", "log_metrics", "no_logs")

# sglang/srt/constants.py: GPU_MEMORY_TYPE_KV_CACHE, _WEIGHTS, _CUDA_GRAPH
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
