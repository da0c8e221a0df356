"""What an evaluation is, stored beside its results: a resumed `masa eval` must continue the same one.

`<out>/manifest.json` holds
- `model`: a fingerprint of every file of the model folder (weights, config, tokenizer, meta-head):
  sha256 over (relative path, size, content digest); a file over `FULL_HASH_BYTES` contributes
  the digest of `SAMPLED_BLOCKS` evenly spaced 1 MiB blocks (first and last included), so a
  multi-GB checkpoint is fingerprinted in about a second (any training step changes every block);
- `benchmarks`: each benchmark's name, file and the file's sha256;
- `settings`: every option of the evaluation (all fields of its argparse namespace, so options
  added later are covered) except `NOT_IDENTITY`, which cannot change a record.

A run into a folder whose results.jsonl has no manifest, or a different one, stops with a
UserError naming each field that differs, unless `--restart` (then the old results are deleted).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from masa_megatron.errors import UserError

MANIFEST = "manifest.json"
RESULTS = "results.jsonl"
# where results go, how they are displayed, batched or laid out over ranks: not part of a result
NOT_IDENTITY = frozenset({"model", "out", "no_progress", "problems_per_batch", "tp", "pp",
                          "data_dir", "restart"})
FULL_HASH_BYTES = 256 << 20
SAMPLED_BLOCKS = 64
_BLOCK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of the file (of its sampled blocks and size when it is over FULL_HASH_BYTES)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(_BLOCK), b""):
                digest.update(block)
        else:
            digest.update(f"sampled {size}".encode())
            for i in range(SAMPLED_BLOCKS):
                f.seek((size - _BLOCK) * i // (SAMPLED_BLOCKS - 1))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """sha256 over (relative path, size, digest) of every file under `folder`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def build_manifest(args, benchmarks: Iterable) -> dict:
    """The identity of the evaluation `args` (masa eval's namespace) on `benchmarks`."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_IDENTITY}
    return {"format": 1,
            "model": {"path": str(Path(args.model).resolve()),
                      "fingerprint": folder_fingerprint(Path(args.model))},
            "benchmarks": {b.name: {"file": str(b.path), "sha256": file_digest(Path(b.path))}
                           for b in benchmarks},
            "settings": json.loads(json.dumps(settings, default=str))}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every identity field that differs."""
    out = []
    if old.get("model", {}).get("fingerprint") != new["model"]["fingerprint"]:
        out.append(f"model: {old.get('model', {}).get('path')} "
                   f"({_short(old.get('model', {}).get('fingerprint'))}) -> "
                   f"{new['model']['path']} ({_short(new['model']['fingerprint'])})")
    old_b, new_b = old.get("benchmarks", {}), new["benchmarks"]
    for name in sorted(set(old_b) | set(new_b)):
        a, b = old_b.get(name, {}).get("sha256"), new_b.get(name, {}).get("sha256")
        if a != b:
            out.append(f"benchmark {name}: {_short(a) if a else 'absent'} -> "
                       f"{_short(b) if b else 'absent'}")
    old_s, new_s = old.get("settings", {}), new["settings"]
    for key in sorted(set(old_s) | set(new_s)):
        if old_s.get(key) != new_s.get(key):
            out.append(f"--{key.replace('_', '-')}: {_short(old_s.get(key))} -> "
                       f"{_short(new_s.get(key))}")
    return out


def claim_output(out: Path, manifest: dict, restart: bool) -> None:
    """Make `out` hold the results of the evaluation `manifest` (rank 0, before any record)."""
    results, stored = out / RESULTS, out / MANIFEST
    if restart:
        for path in (results, stored):
            path.unlink(missing_ok=True)
    has_results = results.is_file() and results.stat().st_size > 0
    if has_results and not stored.is_file():
        raise UserError(f"--out {out}: holds {RESULTS} without {MANIFEST}, so nothing shows "
                        f"which evaluation it continues; pass --restart to discard its results, "
                        f"or choose another --out")
    if has_results:
        diff = differences(json.loads(stored.read_text()), manifest)
        if diff:
            raise UserError(f"--out {out}: its results come from another evaluation "
                            f"({'; '.join(diff)}); pass --restart to discard them, or choose "
                            f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = stored.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, stored)
