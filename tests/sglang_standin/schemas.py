"""SGLang 0.5.x request schemas as the stand-in parses them.

Field names are those of sglang 0.5.3: python/sglang/srt/managers/io_struct.py (GenerateReqInput,
UpdateWeightFromDiskReqInput, UpdateWeightsFromTensorReqInput, InitWeightsUpdateGroupReqInput,
UpdateWeightsFromDistributedReqInput, DestroyWeightsUpdateGroupReqInput, GetWeightsByNameReqInput,
ReleaseMemoryOccupationReqInput, ResumeMemoryOccupationReqInput, AbortReq) and
python/sglang/srt/sampling/sampling_params.py (SamplingParams).

Strictness: a field SGLang does not define is an HTTP 400 here. SGLang itself rejects unknown
sampling parameters (SamplingParams(**params) raises) but its FastAPI/pydantic parsing ignores
unknown top-level fields; the stand-in rejects both, so a misspelt field in our client fails a
test instead of being silently dropped by a real server. A field SGLang defines but the stand-in
does not implement is a 400 too unless it has its default value.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Optional


class BadRequest(ValueError):
    """Answered with HTTP 400 and this message."""


def parse(cls, body: Any, what: Optional[str] = None):
    """`cls(**body)` after checking that `body` is an object with only `cls`'s fields and all
    of its required ones."""
    what = what or cls.__name__
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: expected a JSON object, got {type(body).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise BadRequest(f"{what}: unknown field(s) {unknown} (not in sglang 0.5.x {cls.__name__})")
    missing = [n for n, f in known.items()
               if f.default is MISSING and f.default_factory is MISSING and n not in body]
    if missing:
        raise BadRequest(f"{what}: missing required field(s) {missing}")
    return cls(**body)


def unsupported(obj, defaults: dict, what: str) -> None:
    """400 for fields set away from their default that the stand-in does not implement."""
    bad = [k for k, v in defaults.items() if getattr(obj, k) != v]
    if bad:
        raise BadRequest(f"{what}: field(s) {bad} are valid SGLang fields the stand-in does not "
                         f"implement")


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = 128
    stop: Any = None
    stop_token_ids: Optional[list] = None
    stop_regex: Any = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    structural_tag: Optional[str] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    custom_params: Optional[dict] = None
    stream_interval: Optional[int] = None
    logit_bias: Optional[dict] = None
    sampling_seed: Optional[int] = None


SAMPLING_UNSUPPORTED = {"stop": None, "stop_regex": None, "min_p": 0.0, "frequency_penalty": 0.0,
                        "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
                        "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
                        "custom_params": None, "logit_bias": None}


@dataclass
class GenerateReqInput:
    text: Any = None
    input_ids: Optional[list] = None
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    sampling_params: Optional[dict] = None
    rid: Any = None
    return_logprob: Any = None
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    token_ids_logprob: Any = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    log_metrics: bool = True
    return_hidden_states: Any = False
    modalities: Any = None
    session_params: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    bootstrap_pair_key: Any = None
    data_parallel_rank: Any = None
    background: bool = False
    conversation_id: Any = None
    priority: Any = None
    extra_key: Any = None
    no_logs: bool = False
    custom_labels: Any = None
    return_bytes: bool = False
    return_entropy: bool = False


GENERATE_UNSUPPORTED = {"text": None, "input_embeds": None, "image_data": None, "video_data": None,
                        "audio_data": None, "stream": False, "top_logprobs_num": None,
                        "token_ids_logprob": None, "return_hidden_states": False,
                        "session_params": None, "lora_path": None, "custom_logit_processor": None}


@dataclass
class UpdateWeightFromDiskReqInput:
    model_path: str
    load_format: Optional[str] = None
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False


@dataclass
class UpdateWeightsFromTensorReqInput:
    serialized_named_tensors: list
    load_format: Optional[str] = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None


@dataclass
class InitWeightsUpdateGroupReqInput:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


@dataclass
class UpdateWeightsFromDistributedReqInput:
    names: list
    dtypes: list
    shapes: list
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: Optional[str] = None
    load_format: Optional[str] = None


@dataclass
class DestroyWeightsUpdateGroupReqInput:
    group_name: str = "weight_update_group"


@dataclass
class GetWeightsByNameReqInput:
    name: str
    truncate_size: int = 100


@dataclass
class ReleaseMemoryOccupationReqInput:
    tags: Optional[list] = None


@dataclass
class ResumeMemoryOccupationReqInput:
    tags: Optional[list] = None


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False
    finished_reason: Any = None
    abort_message: Optional[str] = None


MEMORY_TAGS = ("weights", "kv_cache")
