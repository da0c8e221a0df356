"""Checks run with SGLang's own code, in the SGLang side environment (tools/sglang_side_env.sh).

    .venv-sglang/bin/python tests/sglang_contract/side_check.py check CASES.json RESULT.json
    .venv-sglang/bin/python tests/sglang_contract/side_check.py record SCHEMAS.json

This file runs under the side environment's Python (torch and SGLang at the pinned versions) and
imports nothing of masa_megatron, which needs the trainer's torch. tests/test_sglang_contract.py
writes what our code sends into CASES.json and reads the verdicts back. Each check uses the class
or function SGLang itself uses for that step:

- requests: the route's request class is read from the `obj` annotation of its handler in
  sglang/srt/entrypoints/http_server.py; the body is validated as FastAPI does (a pydantic
  TypeAdapter of that class, from JSON), fields the class does not define are flagged (SGLang
  ignores them silently, which would hide a misspelt field of ours), /generate bodies also pass
  SGLang's JSON contract gate (entrypoints/api_contract.py) and `SamplingParams(**params).verify`;
- payloads: /update_weights_from_tensor entries are decoded as the scheduler does
  (Base64Bytes, monkey_patch_torch_reductions, MultiprocessingSerializer.deserialize with its
  SafeUnpickler, then FlattenedTensorBucket.reconstruct_tensors for "flattened_bucket") and the
  tensors compared by name, shape, dtype and a hash of their bytes;
- launch: our server command line is parsed by ServerArgs' own argument parser, the router's by
  sglang_router's;
- stand-in: its recorded schemas (tests/sglang_standin/sglang_schemas.json) and routes are diffed
  against SGLang's classes and http_server.py.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import msgspec

# the request classes the trainer and the stand-in use; recorded by `record`
SCHEMA_CLASSES = (
    "GenerateReqInput", "UpdateWeightFromDiskReqInput", "UpdateWeightsFromTensorReqInput",
    "InitWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput",
    "DestroyWeightsUpdateGroupReqInput", "GetWeightsByNameReqInput",
    "ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput", "AbortReq",
    "BeginWeightUpdateReqInput", "EndWeightUpdateReqInput", "SamplingParams")
_NO_DEFAULT = {"required": True}


def _io_class(name: str):
    if name == "SamplingParams":
        from sglang.srt.sampling.sampling_params import SamplingParams
        return SamplingParams
    from sglang.srt.managers import io_struct
    return getattr(io_struct, name)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _field_spec(default: Any, factory: Any, missing: Any) -> dict:
    if default is not missing:
        return {"default": _jsonable(default)}
    if factory is not missing:
        return {"default": _jsonable(factory())}
    return dict(_NO_DEFAULT)


def class_fields(cls) -> dict[str, dict]:
    """{field: {"required": True} | {"default": value}} of a msgspec Struct, a dataclass or a
    plain class's __init__, as its HTTP JSON body sees it (init fields only)."""
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        return {f.encode_name: _field_spec(f.default, f.default_factory, msgspec.NODEFAULT)
                for f in msgspec.structs.fields(cls)}
    if dataclasses.is_dataclass(cls):
        return {f.name: _field_spec(f.default, f.default_factory, dataclasses.MISSING)
                for f in dataclasses.fields(cls) if f.init}
    import inspect
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: _field_spec(p.default, inspect.Parameter.empty, inspect.Parameter.empty)
            for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL,
                                                                   p.VAR_KEYWORD)}


def http_routes() -> dict[str, dict]:
    """{path: {"methods": [...], "request": class name or None}} from http_server.py's source."""
    from importlib.util import find_spec

    source = Path(find_spec("sglang.srt.entrypoints.http_server").origin).read_text()
    routes: dict[str, dict] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        request = None
        for arg in node.args.args:
            if arg.arg == "obj" and arg.annotation is not None:
                ann = arg.annotation
                if isinstance(ann, ast.Subscript):             # Annotated[X, Body()]
                    ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
                request = ast.unparse(ann)
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and deco.args and isinstance(deco.args[0], ast.Constant)):
                continue
            kind = deco.func.attr
            if kind in ("get", "post", "put", "delete"):
                methods = [kind.upper()]
            elif kind == "api_route":
                methods = next((ast.literal_eval(k.value) for k in deco.keywords
                                if k.arg == "methods"), ["GET"])
            else:
                continue
            routes[deco.args[0].value] = {"methods": sorted(methods), "request": request}
    return routes


# ---------------------------------------------------------------- the checks

def check_request(path: str, body: Any, routes: dict, vocab_size: Optional[int]) -> list[str]:
    """What SGLang would reject, or silently drop, in one request we send."""
    route = routes.get(path)
    if route is None:
        return [f"{path}: SGLang has no such route"]
    name = route["request"]
    if name is None:
        return [] if body in (None, {}) else [f"{path}: SGLang's handler takes no body, we "
                                              f"sent {sorted(body)}"]
    from pydantic import TypeAdapter

    cls = _io_class(name)
    problems = []
    unknown = sorted(set(body) - set(class_fields(cls))) if isinstance(body, dict) else []
    if unknown:
        problems.append(f"{path}: field(s) {unknown} are not in SGLang's {name} (silently "
                        f"ignored by the server)")
    try:
        TypeAdapter(cls).validate_json(json.dumps(body))
    except Exception as err:  # pydantic's ValidationError, or the class's own checks
        problems.append(f"{path}: {name} rejects the body: {err}")
    if path == "/generate":
        from sglang.srt.entrypoints.api_contract import generate_contract_error
        from sglang.srt.sampling.sampling_params import SamplingParams

        error = generate_contract_error(body)
        if error:
            problems.append(f"/generate: SGLang's JSON contract rejects the body: {error}")
        try:
            SamplingParams(**(body.get("sampling_params") or {})).verify(vocab_size)
        except Exception as err:  # SamplingParams raises TypeError/ValueError on bad fields
            problems.append(f"/generate: SamplingParams rejects {body.get('sampling_params')}: "
                            f"{type(err).__name__}: {err}")
    return problems


def _digest(tensor) -> str:
    import torch

    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def decode_payload(text: str, load_format: Optional[str]) -> list:
    """(name, tensor) pairs of one serialized_named_tensors entry, decoded by SGLang's code."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.msgspec_utils import Base64Bytes
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    monkey_patch_torch_reductions()
    raw = Base64Bytes._decode_value(text)           # what the HTTP layer hands the scheduler
    obj = MultiprocessingSerializer.deserialize(raw)
    if load_format == "flattened_bucket":
        bucket = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"],
                                       metadata=obj["metadata"])
        return list(bucket.reconstruct_tensors())
    if load_format is None:
        return [(name, tensor) for name, tensor in obj]
    raise ValueError(f"load_format {load_format!r} is not one SGLang decodes this way")


def check_payload(case: dict) -> list[str]:
    try:
        named = decode_payload(case["text"], case["load_format"])
    except Exception as err:  # whatever SGLang's decoder raises is the verdict
        return [f"payload ({case['load_format']}): SGLang cannot decode it: "
                f"{type(err).__name__}: {err}"]
    got = [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "sha256": _digest(t)} for n, t in named]
    if got != case["tensors"]:
        return [f"payload ({case['load_format']}): SGLang decoded {got}, expected "
                f"{case['tensors']}"]
    return []


def check_launch(server_argv: list[str], router_argv: list[str]) -> list[str]:
    problems = []
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(exit_on_error=False)
    ServerArgs.add_cli_args(parser)
    try:
        parser.parse_args(server_argv)
    except (argparse.ArgumentError, SystemExit) as err:
        problems.append(f"sglang.launch_server rejects {server_argv}: {err}")
    from sglang_router.router_args import RouterArgs

    parser = argparse.ArgumentParser(exit_on_error=False)
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    try:
        parser.parse_args(router_argv)
    except (argparse.ArgumentError, SystemExit) as err:
        problems.append(f"sglang_router.launch_router rejects {router_argv}: {err}")
    return problems


def check_standin(standin: dict, routes: dict) -> list[str]:
    """The stand-in's recorded schemas and its routes against SGLang's."""
    problems = []
    for name, recorded in standin["schemas"].items():
        live = class_fields(_io_class(name))
        if recorded != live:
            missing, extra = sorted(set(live) - set(recorded)), sorted(set(recorded) - set(live))
            changed = sorted(k for k in set(live) & set(recorded) if live[k] != recorded[k])
            problems.append(f"stand-in schema {name} differs from SGLang's: missing {missing}, "
                            f"not in SGLang {extra}, other default/required {changed}")
    for path, spec in standin["routes"].items():
        real = routes.get(path)
        if real is None:
            problems.append(f"stand-in route {path}: SGLang has no such route")
            continue
        if not set(spec["methods"]) <= set(real["methods"]):
            problems.append(f"stand-in route {path}: methods {spec['methods']}, SGLang "
                            f"{real['methods']}")
        if spec["request"] != real["request"]:
            problems.append(f"stand-in route {path}: parses {spec['request']}, SGLang "
                            f"{real['request']}")
    return problems


def run_checks(cases: dict) -> dict:
    routes = http_routes()
    out: dict[str, list] = {"requests": [], "payloads": [], "launch": [], "standin": []}
    for req in cases.get("requests", []):
        out["requests"].append(check_request(req["path"], req["body"], routes,
                                             cases.get("vocab_size")))
    for payload in cases.get("payloads", []):
        out["payloads"].append(check_payload(payload))
    if "launch" in cases:
        out["launch"] = check_launch(cases["launch"]["server"], cases["launch"]["router"])
    if "standin" in cases:
        out["standin"] = check_standin(cases["standin"], routes)
    import sglang
    out["sglang_version"] = sglang.__version__
    return out


def record() -> dict:
    """The schemas the stand-in serves, as SGLang defines them."""
    import sglang
    return {"sglang_version": sglang.__version__,
            "schemas": {name: class_fields(_io_class(name)) for name in SCHEMA_CLASSES}}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("cases")
    c.add_argument("result")
    r = sub.add_parser("record")
    r.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "check":
        result = run_checks(json.loads(Path(args.cases).read_text()))
        Path(args.result).write_text(json.dumps(result, indent=1))
    else:
        Path(args.out).write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
