"""Reading and writing slices of HF safetensors files without holding (or mapping) whole files.

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}}`, then the data (offsets relative to 8 + N).
Tensors are row-major, so rows [a, b) of a tensor are one contiguous byte range; a column range
[c, d) of a 2-D tensor is read a block of rows at a time (at most `_BLOCK_BYTES` extra memory).
Reading with `readinto` straight into the destination tensor keeps a rank's memory near the
size of the slices it owns (a memory map would make every touched page count too).

Writing mirrors it: `SafetensorsWriter` lays out the header from the names, dtypes and shapes
known in advance, then each piece of a tensor is written at its place as it arrives.

Errors (`ModelLoadError`) name the file and the tensor: a missing shard, a tensor absent from
the index or from its file, a header or data region cut short (truncated file).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import torch

from masa_megatron.model.hf_config import ModelLoadError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_BLOCK_BYTES = 4 << 20
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file: its header, and reads of row/column ranges of its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"{self.path}: file does not exist")
        self.size = self.path.stat().st_size
        self._fh = open(self.path, "rb")
        raw = self._fh.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{self.path}: truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw)
        if 8 + header_len > self.size:
            raise ModelLoadError(f"{self.path}: truncated (header of {header_len} bytes, file of "
                                 f"{self.size} bytes)")
        try:
            header = json.loads(self._fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelLoadError(f"{self.path}: corrupt safetensors header ({err})") from None
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self.data_start = 8 + header_len

    def close(self) -> None:
        self._fh.close()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelLoadError(f"{self.path}: tensor '{name}' is not in this file")
        return entry

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tensor[rows] (or tensor[rows, cols] of a 2-D tensor), read from disk.

        With `out` the result goes there (and is returned): straight from disk when `out` is a
        contiguous CPU tensor of the file's dtype, else through a host temporary (a cast, or a
        copy to the GPU)."""
        entry = self._entry(name)
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelLoadError(f"{self.path}: tensor '{name}' has unsupported dtype "
                                 f"{entry['dtype']}")
        self._check_bounds(name, entry)
        shape = list(entry["shape"]) or [1]
        r0, r1, _ = (rows or slice(None)).indices(shape[0])
        c0, c1 = 0, None
        if cols is not None:
            if len(shape) != 2:
                raise ValueError(f"column slices need a 2-D tensor; '{name}' has {shape}")
            c0, c1, _ = cols.indices(shape[1])
        result_shape = [r1 - r0] + shape[1:] if cols is None else [r1 - r0, c1 - c0]
        if out is not None and (out.dtype != dtype or not out.is_contiguous()
                                or out.device.type != "cpu"):
            out.copy_(self.read(name, rows, cols).reshape(out.shape))
            return out
        if out is None:
            out = torch.empty(result_shape, dtype=dtype)
        elif out.numel() != _numel(result_shape):
            raise ValueError(f"{self.path}: destination {list(out.shape)} does not fit "
                             f"{result_shape} of '{name}'")
        row_bytes = _numel(shape[1:]) * out.element_size()
        base = self.data_start + entry["data_offsets"][0]
        if cols is None:
            self._read_into(out, base + r0 * row_bytes, name)
            return out if entry["shape"] else out.reshape(())
        dest = out.view(r1 - r0, c1 - c0)
        block_rows = max(1, _BLOCK_BYTES // max(row_bytes, 1))
        for first in range(r0, r1, block_rows):
            last = min(r1, first + block_rows)
            block = torch.empty(last - first, shape[1], dtype=dtype)
            self._read_into(block, base + first * row_bytes, name)
            dest[first - r0:last - r0].copy_(block[:, c0:c1])
        return out

    def _check_bounds(self, name: str, entry: dict) -> None:
        end = entry["data_offsets"][1]
        if self.data_start + end > self.size:
            raise ModelLoadError(f"{self.path}: truncated: tensor '{name}' needs bytes up to "
                                 f"{self.data_start + end}, the file has {self.size}")

    def _read_into(self, out: torch.Tensor, offset: int, name: str) -> None:
        if out.numel() == 0:
            return
        view = out.view(torch.uint8).reshape(-1).numpy()
        self._fh.seek(offset)
        got = self._fh.readinto(view)
        if got != view.nbytes:
            raise ModelLoadError(f"{self.path}: truncated while reading tensor '{name}'")


class HFCheckpoint:
    """An HF checkpoint folder: a sharded index or a single model.safetensors."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ModelLoadError(f"{index}: not a valid safetensors index ({err})") from None
            self.weight_map: dict[str, str] = dict(weight_map)
            self.index_path: Optional[Path] = index
        elif single.is_file():
            self.index_path = None
            self.weight_map = {name: SINGLE_NAME for name in SafetensorsFile(single).entries}
        else:
            raise ModelLoadError(f"{self.folder}: no {INDEX_NAME} or {SINGLE_NAME} (only "
                                 f"safetensors checkpoints are supported)")
        self._files: dict[str, SafetensorsFile] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def file_of(self, name: str) -> SafetensorsFile:
        fname = self.weight_map.get(name)
        if fname is None:
            raise ModelLoadError(f"{self.folder}: tensor '{name}' is not in the checkpoint")
        if fname not in self._files:
            path = self.folder / fname
            if not path.is_file():
                where = f" (listed in {INDEX_NAME})" if self.index_path else ""
                raise ModelLoadError(f"{path}: shard file is missing{where}; it holds tensor "
                                     f"'{name}'")
            self._files[fname] = SafetensorsFile(path)
        shard = self._files[fname]
        if name not in shard:
            raise ModelLoadError(f"{shard.path}: tensor '{name}' is listed in {INDEX_NAME} but "
                                 f"not in the file")
        return shard

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)

    def read(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.file_of(name).read(name, rows, cols, out)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class SafetensorsWriter:
    """A safetensors file whose tensors (names, dtypes, shapes) are known before their data.

    The header is written first and the file sized to its final length; `write` then puts each
    piece (a row range, or a column range of a 2-D tensor) at its byte offset."""

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt"}}
        self._layout: dict[str, tuple[int, tuple[int, ...], int]] = {}
        offset = 0
        for name, dtype, shape in tensors:
            item = torch.empty((), dtype=dtype).element_size()
            nbytes = item * _numel(shape)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, tuple(shape), item)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.nbytes = offset
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self.data_start + offset)

    def write(self, name: str, axis: int, start: int, data: torch.Tensor) -> None:
        """Write `data` as rows [start, ...) (axis 0) or columns [start, ...) (axis 1) of `name`."""
        offset, shape, item = self._layout[name]
        data = data.contiguous()
        raw = data.view(torch.uint8).reshape(-1).numpy() if data.numel() else None
        if raw is None:
            return
        base = self.data_start + offset
        row_bytes = item * _numel(shape[1:])
        if axis == 0 or data.shape[1] == shape[1]:   # whole rows: one contiguous range
            self._pwrite(raw, base + (start if axis == 0 else 0) * row_bytes)
            return
        rows, width = data.shape[0], data.shape[1] * item
        for i in range(rows):
            self._pwrite(raw[i * width:(i + 1) * width], base + i * row_bytes + start * item)

    def _pwrite(self, raw, offset: int) -> None:
        view = memoryview(raw)
        while len(view):
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def close(self) -> None:
        os.close(self._fd)


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
