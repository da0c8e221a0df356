"""`masa convert hf2mcore | mcore2hf`: HF checkpoints <-> Megatron distributed checkpoints.

Both run in one process for TP = PP = 1; for a larger layout launch TP x PP (x DP) processes:

    torchrun --nproc_per_node=2 tools/convert_hf_to_megatron.py --hf DIR --out CKPT --tp 2
    python tools/convert_megatron_to_hf.py --ckpt CKPT --out HF_DIR    # dtype: the checkpoint's

A Megatron checkpoint saved at any TP/PP (by the converter or by the trainer under
<ckpt>/model) is exported at whatever layout the export runs with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

_SIZE_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def _size(text: str) -> int:
    for unit, scale in _SIZE_UNITS.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def _layout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    """--out must not hold anything unless --overwrite (checked before any work)."""
    from masa_megatron.errors import UserError
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")


def _say(message: str) -> None:
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)


def _run(body, args) -> int:
    from masa_megatron.config import ParallelConfig
    from masa_megatron.errors import UserError
    from masa_megatron.parallel import destroy_parallel, init_parallel

    try:
        init_parallel(ParallelConfig(tensor_model_parallel_size=args.tp,
                                     pipeline_model_parallel_size=args.pp))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        body(args)
        return 0
    except (UserError, FileExistsError) as err:   # bad input: one line, exit code 2
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()


def hf_to_megatron_main(argv: Optional[list[str]] = None) -> int:
    """HF safetensors folder -> Megatron distributed checkpoint at a chosen TP/PP."""
    parser = argparse.ArgumentParser(
        prog="convert_hf_to_megatron", description=hf_to_megatron_main.__doc__,
        epilog="For TP*PP > 1 launch TP*PP processes with torchrun.")
    parser.add_argument("--hf", required=True, type=Path, help="HF checkpoint folder")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint folder")
    _layout_args(parser)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="parameter dtype of the saved checkpoint (default fp32)")
    parser.add_argument("--layer-spec", default="auto", choices=("auto", "local", "te"))
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    def body(args):
        import shutil

        import torch

        from masa_megatron.config import ModelConfig
        from masa_megatron.model.builder import build_gpt_model
        from masa_megatron.model.checkpoint_io import save_dist_checkpoint
        from masa_megatron.model.hf_io import load_hf_weights

        model_cfg = ModelConfig(hf_path=str(args.hf), dtype=args.dtype,
                                layer_spec=args.layer_spec,
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
        _refuse_existing(args.out, args.overwrite)
        model = build_gpt_model(args.hf, model_cfg)
        load_hf_weights(model, args.hf, progress=True)
        if args.out.exists() and (not torch.distributed.is_initialized()
                                  or torch.distributed.get_rank() == 0):
            shutil.rmtree(args.out)            # --overwrite (checked above)
        _say(f"saving distributed checkpoint to {args.out}")
        save_dist_checkpoint(model, args.out, hf_source_dir=args.hf)
        _say("done")

    return _run(body, args)


def megatron_to_hf_main(argv: Optional[list[str]] = None) -> int:
    """Megatron distributed checkpoint (any TP/PP) -> HF safetensors folder."""
    parser = argparse.ArgumentParser(
        prog="convert_megatron_to_hf", description=megatron_to_hf_main.__doc__,
        epilog="The export layout (--tp/--pp) need not match the layout the checkpoint was "
               "saved with.")
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="model checkpoint folder (with masa_model.json)")
    parser.add_argument("--out", required=True, type=Path, help="output HF folder")
    _layout_args(parser)
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="dtype of the exported tensors (default: the checkpoint's own)")
    parser.add_argument("--hf-config", type=Path, default=None,
                        help="folder whose config/tokenizer files to use instead of <ckpt>/hf")
    parser.add_argument("--max-shard-size", default="2GB", help="e.g. 500MB, 2GB (default 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)

    def body(args):
        from masa_megatron.config import ModelConfig
        from masa_megatron.model.builder import build_gpt_model
        from masa_megatron.model.checkpoint_io import (
            HF_SUBDIR, check_dist_checkpoint, checkpoint_dtype, load_dist_checkpoint,
            read_checkpoint_meta)
        from masa_megatron.model.hf_io import export_hf_checkpoint

        _refuse_existing(args.out, args.overwrite)
        meta = read_checkpoint_meta(args.ckpt)
        check_dist_checkpoint(args.ckpt)
        dtype = args.dtype or checkpoint_dtype(meta)
        source = args.hf_config or args.ckpt / HF_SUBDIR
        hf_config = source if args.hf_config else meta["hf_config"]
        model_cfg = ModelConfig(hf_path=str(source), layer_spec=meta.get("layer_spec", "auto"))
        model = build_gpt_model(hf_config, model_cfg, padded_vocab=meta["padded_vocab_size"])
        _say(f"loading {args.ckpt} (saved at TP={meta['tensor_model_parallel_size']}, "
             f"PP={meta['pipeline_model_parallel_size']})")
        load_dist_checkpoint(model, args.ckpt)
        export_hf_checkpoint(model, args.out, dtype=dtype, source_dir=source,
                             max_shard_bytes=_size(args.max_shard_size),
                             overwrite=args.overwrite, progress=True)
        origin = "as asked" if args.dtype else "the checkpoint's own"
        _say(f"wrote {args.out} (dtype {dtype}, {origin})")

    return _run(body, args)
