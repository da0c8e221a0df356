"""HF safetensors -> a TP/PP-sharded GPTModel, and the model -> an HF checkpoint folder.

Load: every rank walks its own parameters, maps each to HF tensors with the family's rules and
reads from disk, straight into the parameter, only the pieces it owns (sharding.shard_pieces),
so a rank's peak memory stays near the size of its shard. Each HF tensor's full shape is checked
against the config first.

Export: within each pipeline stage of data-parallel replica 0, TP rank 0 writes the stage's
safetensors files (at most `max_shard_bytes` each; layout fixed up front from the shapes). For
each parameter the other TP ranks send it their shard in turn, and each shard's pieces go
straight to their places in the file (padding rows dropped, FP8 dequantised, cast to the export
dtype), so no rank ever holds a full tensor. Global rank 0 then numbers the files, writes
model.safetensors.index.json, config.json, generation_config.json and copies the tokenizer files
from `source_dir`. Everything goes to a temporary folder next to the target, renamed at the end,
so a failure never leaves a half-written output folder.
"""
from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from masa_megatron.compat.cpu import trim_host_memory
from masa_megatron.model.hf_config import ModelLoadError, decoder_shape
from masa_megatron.model.registry import FamilySpec, Split, WeightRule, family_for
from masa_megatron.model.safetensors_io import INDEX_NAME, HFCheckpoint, SafetensorsWriter
from masa_megatron.model.sharding import Piece, hf_shapes, shard_pieces, shard_views
from masa_megatron.parallel import broadcast_from_rank0

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TIED_SOURCE = "model.embed_tokens.weight"


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    from megatron.core.models.gpt import GPTModel

    while not isinstance(model, GPTModel) and hasattr(model, "module"):
        model = model.module
    return model


def _as_chunks(models) -> list:
    return [unwrap(m) for m in (models if isinstance(models, (list, tuple)) else [models])]


def mapped_parameters(model, family: Optional[FamilySpec] = None
                      ) -> Iterator[tuple[str, torch.nn.Parameter, WeightRule, tuple[str, ...]]]:
    """(local name, parameter, rule, HF names) for every parameter of one GPTModel chunk.

    Layer indices in HF names are global (`layer_number - 1` of the chunk's layer)."""
    model = unwrap(model)
    family = family or family_for(model.masa_hf_config)
    spec = model.masa_layer_spec
    tied = decoder_shape(model.masa_hf_config).tie_embeddings
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        layer = None
        template = name
        if match:
            layer = model.decoder.layers[int(match.group(1))].layer_number - 1
            template = "decoder.layers.{i}." + match.group(2)
        rule = family.rule_for(template, spec)
        if rule is None:
            raise ModelLoadError(f"no HF mapping for Megatron parameter '{name}' "
                                 f"(family {family.name}, layer spec {spec})")
        hf_names = tuple(n.format(i=layer) for n in rule.hf)
        if tied and template == "output_layer.weight":
            hf_names = (_TIED_SOURCE,)
        yield name, param, rule, hf_names


def _tp() -> tuple[int, int, object]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_tensor_model_parallel_group())


def load_hf_weights(models, hf_path: str | Path, *, progress: bool = False) -> None:
    """Copy an HF safetensors checkpoint into this rank's model chunk(s), reading only its slices."""
    tp_rank, tp, _ = _tp()
    ckpt = HFCheckpoint(hf_path)
    try:
        for chunk in _as_chunks(models):
            shape = decoder_shape(chunk.masa_hf_config)
            items = list(mapped_parameters(chunk))
            for name, param, rule, hf_names in _progress(items, progress, "load HF weights"):
                expected = hf_shapes(rule, param.shape, tp, shape)
                for hf_name, want in zip(hf_names, expected):
                    have = ckpt.shape(hf_name)
                    if tuple(have) != tuple(want):
                        raise ModelLoadError(
                            f"{ckpt.file_of(hf_name).path}: tensor '{hf_name}' has shape "
                            f"{list(have)}, but config.json ({shape.architecture}) needs "
                            f"{list(want)} (for Megatron '{name}')")
                with torch.no_grad():
                    _load_param(ckpt, param, rule, hf_names, tp_rank, tp, shape)
    finally:
        ckpt.close()
        trim_host_memory()


def _piece_slices(piece: Piece) -> dict:
    span = slice(piece.start, piece.stop)
    return {"rows": span} if piece.axis == 0 else {"cols": span}


def _load_param(ckpt: HFCheckpoint, param, rule: WeightRule, hf_names, tp_rank: int, tp: int,
                shape) -> None:
    plain = type(param.data) is torch.Tensor
    target = param.data if plain else torch.empty(param.shape, dtype=param.dtype)
    views = shard_views(rule, target, tp_rank, shape)
    for piece, view in zip(shard_pieces(rule, tp_rank, tp, target.shape, shape), views):
        ckpt.read(hf_names[piece.hf_index], out=view, **_piece_slices(piece))
    if rule.split is Split.VOCAB:  # padding rows
        target[(views[0].shape[0] if views else 0):].zero_()
    if not plain:  # e.g. a TE Float8Tensor: copy_ quantises
        param.copy_(target)


def _progress(items, enabled: bool, desc: str):
    if not enabled or (torch.distributed.is_initialized() and torch.distributed.get_rank()):
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc)


def to_export_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A plain contiguous tensor of `dtype` on the tensor's device (no copy when it already is
    one); TE quantised tensors (Float8Tensor, ...) are dequantised, torch.float8 ones cast."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "dequantize"):
        data = data.dequantize()
    return data.detach().to(dtype=dtype).contiguous()


def _dist() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _StageFiles:
    """The stage's output files, laid out from the (name, dtype, shape) of its HF tensors."""

    def __init__(self, tmp: Path, stage: int, tensors: list, max_shard_bytes: int):
        groups: list[list] = [[]]
        size = 0
        for entry in tensors:
            nbytes = entry[1].itemsize * entry[2].numel()
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        self.writers = [SafetensorsWriter(tmp / f"stage{stage:03d}-{i:05d}.safetensors",
                                          [(n, d, tuple(s)) for n, d, s in group])
                        for i, group in enumerate(groups) if group]
        self.writer_of = {name: w for w, group in zip(self.writers, groups) for name, _, _ in group}

    def manifest(self) -> list[dict]:
        for w in self.writers:
            w.close()
        return [{"file": w.path.name, "tensors": sorted(n for n, v in self.writer_of.items()
                                                        if v is w), "bytes": w.nbytes}
                for w in self.writers]


def _write_stage_files(chunks, tmp: Path, dtype: torch.dtype, max_shard_bytes: int,
                       progress: bool) -> list[dict]:
    """Stream this stage's parameters, shard by shard, into its files (on TP rank 0)."""
    from megatron.core import parallel_state as ps

    tp_rank, tp, group = _tp()
    initialised = ps.model_parallel_is_initialized()
    if initialised and ps.get_data_parallel_rank() != 0:
        return []
    stage = ps.get_pipeline_model_parallel_rank() if initialised else 0
    writer_rank = torch.distributed.get_process_group_ranks(group)[0] if tp > 1 else 0
    items = []
    for chunk in chunks:
        shape = decoder_shape(chunk.masa_hf_config)
        for name, param, rule, hf_names in mapped_parameters(chunk):
            if shape.tie_embeddings and name == "output_layer.weight":
                continue  # the tied copy on the last stage; HF keeps only embed_tokens
            items.append((param, rule, hf_names, hf_shapes(rule, param.shape, tp, shape), shape))
    files = None
    if tp_rank == 0:
        tensors = [(n, dtype, torch.Size(s)) for _, _, names, shapes, _ in items
                   for n, s in zip(names, shapes)]
        files = _StageFiles(tmp, stage, tensors, max_shard_bytes)
    for param, rule, hf_names, full_shapes, shape in _progress(items, progress, "export"):
        local = to_export_tensor(param, dtype)
        senders = 1 if rule.split is Split.REPLICATED else tp
        if tp_rank != 0:
            if tp_rank < senders:
                torch.distributed.send(local, dst=writer_rank, group=group)
            continue
        for rank in range(senders):
            part = local
            if rank:
                part = torch.empty_like(local)
                src = torch.distributed.get_process_group_ranks(group)[rank]
                torch.distributed.recv(part, src=src, group=group)
            part = part.cpu()
            views = shard_views(rule, part, rank, shape)
            for piece, view in zip(shard_pieces(rule, rank, tp, part.shape, shape), views):
                hf_name = hf_names[piece.hf_index]
                data = view.reshape(piece.shape(full_shapes[piece.hf_index]))
                files.writer_of[hf_name].write(hf_name, piece.axis, piece.start, data)
    return files.manifest() if files is not None else []


def _hf_metadata(hf_config: dict, dtype_name: str, out: Path, source_dir: Optional[Path]) -> None:
    config = dict(hf_config)
    torch_name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype_name]
    config["torch_dtype"] = torch_name
    if "dtype" in config:
        config["dtype"] = torch_name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = source_dir / "generation_config.json" if source_dir else None
    if gen is not None and gen.is_file():
        shutil.copy2(gen, out / "generation_config.json")
    else:
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        gen_cfg = {k: config[k] for k in keys if config.get(k) is not None}
        gen_cfg["_from_model_config"] = True
        (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, out / name)


def _finish(tmp: Path, target: Path, manifests: Sequence[list[dict]], hf_config: dict,
            dtype_name: str, source_dir: Optional[Path], overwrite: bool) -> None:
    entries = sorted((f for stage in manifests for f in stage), key=lambda f: f["file"])
    total = len(entries)
    weight_map, total_bytes = {}, 0
    for i, entry in enumerate(entries, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (tmp / entry["file"]).rename(tmp / final)
        weight_map.update({name: final for name in entry["tensors"]})
        total_bytes += entry["bytes"]
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    _hf_metadata(hf_config, dtype_name, tmp, source_dir)
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_hf_checkpoint(models, out_dir: str | Path, *, dtype: str = "bf16",
                         source_dir: Optional[str | Path] = None,
                         max_shard_bytes: int = 2 << 30, overwrite: bool = False,
                         progress: bool = False) -> Path:
    """Write the model as an HF checkpoint folder loadable by AutoModelForCausalLM.

    Collective: every rank of the model must call it. Returns the output folder."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}: must be one of {', '.join(EXPORT_DTYPES)}")
    chunks = _as_chunks(models)
    hf_config = chunks[0].masa_hf_config
    target = Path(out_dir).absolute()
    source = Path(source_dir) if source_dir else None
    rank, world = _dist()
    plan = None
    if rank == 0:  # rank 0 decides, every rank learns the outcome (no rank left waiting)
        plan = ("error", f"{target} exists (pass overwrite=True to replace it)") \
            if target.exists() and not overwrite else \
            ("tmp", str(target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")))
    kind, value = broadcast_from_rank0(plan)
    if kind == "error":
        raise FileExistsError(value)
    tmp = Path(value)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        files = _write_stage_files(chunks, tmp, EXPORT_DTYPES[dtype], max_shard_bytes, progress)
        manifests = [files]
        if world > 1:
            manifests = [None] * world
            torch.distributed.all_gather_object(manifests, files)
        if rank == 0:
            _finish(tmp, target, manifests, hf_config, dtype, source, overwrite)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world > 1:
        torch.distributed.barrier()
    return target
