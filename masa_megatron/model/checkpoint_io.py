"""Megatron distributed checkpoints of the model (megatron.core.dist_checkpointing, torch_dist).

A model checkpoint folder holds the sharded tensors (resharding to any TP/PP on load), plus:
- `masa_model.json`: family, layer spec, padded vocabulary size, the saving TP/PP and the HF
  config, so a converter can rebuild the model without the original HF folder;
- `hf/`: config.json, generation_config.json and tokenizer files copied from the HF source.

The trainer stores its model under `<ckpt>/model` with `save_dist_checkpoint`, so
`masa convert mcore2hf` reads trainer checkpoints too. Megatron's own save creates a spawn-context
multiprocessing manager that re-imports `__main__` (a script without a `__main__` guard hangs);
`save_dist_checkpoint` has it forked instead (compat.megatron_versions), but a guard stays good
practice.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from masa_megatron.model.hf_config import ModelLoadError
from masa_megatron.model.hf_io import TOKENIZER_FILES, unwrap

META_NAME = "masa_model.json"
HF_SUBDIR = "hf"


def _single_chunk(models):
    chunks = models if isinstance(models, (list, tuple)) else [models]
    if len(chunks) != 1:
        raise NotImplementedError("virtual pipeline chunks are not supported by model checkpoints")
    return chunks[0]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def checkpoint_dtype(meta: dict) -> str:
    """The parameter dtype a checkpoint was saved in (fp32 | bf16 | fp16): `params_dtype` of
    `masa_model.json`, else (checkpoints written before it was recorded) its HF config's dtype."""
    if meta.get("params_dtype"):
        return meta["params_dtype"]
    hf = meta.get("hf_config") or {}
    return _HF_DTYPE_NAMES.get(str(hf.get("torch_dtype") or hf.get("dtype")), "fp32")


def _model_meta(model) -> dict:
    from megatron.core import package_info
    from megatron.core import parallel_state as ps

    gpt = unwrap(model)
    tp = ps.get_tensor_model_parallel_world_size()
    return {
        "format": 1,
        "family": gpt.masa_family,
        "layer_spec": gpt.masa_layer_spec,
        "padded_vocab_size": gpt.vocab_size,
        "params_dtype": _DTYPE_NAMES.get(next(gpt.parameters()).dtype, "fp32"),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "megatron_core_version": package_info.__version__,
        "hf_config": gpt.masa_hf_config,
    }


def save_dist_checkpoint(models, ckpt_dir: str | Path, *,
                         hf_source_dir: Optional[str | Path] = None) -> Path:
    """Save the model's sharded state into `ckpt_dir` (collective; the folder is created)."""
    from megatron.core import dist_checkpointing

    from masa_megatron.compat.megatron_versions import use_fork_for_checkpoint_queue

    use_fork_for_checkpoint_queue()
    model = _single_chunk(models)
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(ckpt_dir))
    write_checkpoint_metadata(model, ckpt_dir, hf_source_dir=hf_source_dir)
    return ckpt_dir


def write_checkpoint_metadata(models, ckpt_dir: str | Path, *,
                              hf_source_dir: Optional[str | Path] = None) -> None:
    """`masa_model.json` and `hf/` (config, tokenizer) next to sharded model tensors, so that
    converters and `masa eval` can rebuild the model (collective; rank 0 writes). The trainer
    calls it for the `model/` folder of its checkpoints, which also hold the optimizer."""
    model = _single_chunk(models)
    ckpt_dir = Path(ckpt_dir)
    if _rank() == 0:
        meta = _model_meta(model)
        hf_dir = ckpt_dir / HF_SUBDIR
        hf_dir.mkdir(exist_ok=True)
        (hf_dir / "config.json").write_text(json.dumps(meta["hf_config"], indent=2) + "\n")
        if hf_source_dir is not None:
            for name in ("generation_config.json",) + TOKENIZER_FILES:
                src = Path(hf_source_dir) / name
                if src.is_file():
                    shutil.copy2(src, hf_dir / name)
        (ckpt_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """The `masa_model.json` of a model checkpoint folder."""
    path = Path(ckpt_dir) / META_NAME
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing; {ckpt_dir} is not a masa model checkpoint "
                             f"(saved by save_dist_checkpoint)")
    return json.loads(path.read_text())


def check_dist_checkpoint(ckpt_dir: str | Path, owner: Optional[str | Path] = None) -> None:
    """ModelLoadError naming the checkpoint (`owner`, default `ckpt_dir`; files are named
    relative to it) and the shard when its index (`.metadata`) is unreadable, or a shard it lists
    is missing or shorter than the byte ranges the index puts in it (a truncated write). Cheap:
    reads the index and stats the shards, not their data."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    owner = Path(owner) if owner is not None else ckpt_dir
    rel = ckpt_dir.relative_to(owner).as_posix() + "/" if ckpt_dir != owner else ""

    def damaged(what: str) -> ModelLoadError:
        return ModelLoadError(f"checkpoint {owner} is damaged: {what}")

    if not (ckpt_dir / ".metadata").is_file():
        raise damaged(f"its index {rel}.metadata is missing")
    try:
        index = FileSystemReader(str(ckpt_dir)).read_metadata()
    except (EOFError, OSError, ValueError, pickle.UnpicklingError, AttributeError) as err:
        raise damaged(f"its index {rel}.metadata cannot be read ({type(err).__name__})") from None
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = ckpt_dir / name
        if not shard.is_file():
            raise damaged(f"shard {rel}{name} is missing")
        if shard.stat().st_size < size:
            raise damaged(f"shard {rel}{name} has {shard.stat().st_size} bytes, its index "
                          f"needs {size}")


def load_dist_checkpoint(models, ckpt_dir: str | Path) -> None:
    """Load a model checkpoint saved at any TP/PP into this rank's model (collective).

    The model must be built with the checkpoint's padded vocabulary size
    (`build_gpt_model(..., padded_vocab=read_checkpoint_meta(dir)["padded_vocab_size"])`)."""
    from megatron.core import dist_checkpointing

    model = unwrap(_single_chunk(models))
    meta = read_checkpoint_meta(ckpt_dir)
    if meta["padded_vocab_size"] != model.vocab_size:
        raise ModelLoadError(
            f"{Path(ckpt_dir) / META_NAME}: the checkpoint's padded vocabulary has "
            f"{meta['padded_vocab_size']} rows, the model {model.vocab_size}; build the model "
            f"with padded_vocab={meta['padded_vocab_size']}")
    check_dist_checkpoint(ckpt_dir)
    request = model.sharded_state_dict()
    state = dist_checkpointing.load(request, str(ckpt_dir))
    # a training checkpoint also holds optimizer and scheduler state: keep the model's entries
    model.load_state_dict({k: v for k, v in state.items() if k in request}, strict=True)
