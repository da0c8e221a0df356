"""Weight sync through the file system: the fallback that always works.

Data path: every trainer rank takes part in `masa_megatron.model.export_hf_checkpoint` (TP shards
all-gathered within each pipeline stage, one writer per stage, safetensors files of at most
`bucket_bytes`, written to a temporary folder and renamed), producing `<sync_dir>/v<version>`, a
complete HF folder (config, tokenizer files copied from the source model). Global rank 0 then
POSTs /update_weights_from_disk {"model_path", "weight_version"} to every server (sglang 0.5.x
UpdateWeightFromDiskReqInput; the server reads the folder with its own loader, so the folder must
be on a file system the servers see) and, once all succeed, deletes the previous version's folder.
The export dtype is the model's params dtype unless `export_dtype` is given.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from masa_megatron.rollout.weight_sync import SyncTarget, WeightSync, barrier, on_rank0
from masa_megatron.rollout.weight_sync.buckets import params_dtype

log = logging.getLogger(__name__)
_EXPORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def load_from_disk(target: SyncTarget, path: str, version: int) -> None:
    """Collective: every server loads the HF folder `path` (called from all ranks)."""
    def post() -> None:
        body = {"model_path": str(path), "weight_version": str(version)}
        for reply in target.http.call_all(target.urls, "/update_weights_from_disk", body,
                                          retries=0):
            reply.check()
    on_rank0(post)


class DiskSync(WeightSync):
    name = "disk"

    def __init__(self, target: SyncTarget, *, export_dtype: Optional[str] = None,
                 keep_versions: int = 1, **common: Any):
        super().__init__(target, **common)
        self.export_dtype, self.keep_versions = export_dtype, max(1, keep_versions)
        self._owned_tmp: Optional[str] = None
        if self.sync_dir is None:
            rank_dir = tempfile.mkdtemp(prefix="masa-weight-sync-") if world_rank() == 0 else None
            self.sync_dir = _share(rank_dir)
            self._owned_tmp = self.sync_dir if world_rank() == 0 else None
        self._versions: list[Path] = []

    def _transfer(self, model_chunks: Any, version: int) -> tuple[int, int]:
        from masa_megatron.model import export_hf_checkpoint

        dtype = self.export_dtype or _EXPORT_NAMES.get(params_dtype(model_chunks), "bf16")
        folder = Path(self.sync_dir) / f"v{version}"
        export_hf_checkpoint(model_chunks, folder, dtype=dtype, source_dir=self.source_dir,
                             max_shard_bytes=self.bucket_bytes, overwrite=True)
        load_from_disk(self.target, str(folder), version)
        self._versions.append(folder)
        nbytes, nfiles = 0, 0
        if world_rank() == 0:
            files = list(folder.glob("*.safetensors"))
            nbytes, nfiles = sum(f.stat().st_size for f in files), len(files)
            if self.verify:
                self._samples_from_folder(folder)
            while len(self._versions) > self.keep_versions:
                shutil.rmtree(self._versions.pop(0), ignore_errors=True)
        barrier()
        return nbytes, nfiles

    def _samples_from_folder(self, folder: Path) -> None:
        from safetensors import safe_open

        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for index, name in enumerate(sorted(f.keys())):
                    self.record_sample(index, name, f.get_slice(name)[:self.verify_rows])

    def close(self) -> None:
        if self._owned_tmp:
            shutil.rmtree(self._owned_tmp, ignore_errors=True)
            self._owned_tmp = None


def world_rank() -> int:
    from masa_megatron.rollout.weight_sync import world

    return world()[0]


def _share(obj: Any) -> Any:
    from masa_megatron.rollout.weight_sync import world

    if world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
