"""Raw safetensors streaming: read a shard's header; write a shard whose tensors are byte ranges of another.

File format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data.
Offsets count from the end of the header. Tensors are never decoded: FP8 bytes stay bit-identical, and
memory stays at one copy buffer whatever the tensor size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself enforces
COPY_BUFFER = 1 << 20  # see copy_range
PROGRESS_CHUNK = 64 << 20  # bytes between progress updates


class SafetensorsError(ValueError):
    """A corrupt or truncated shard; the message names the file and the fix."""


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    assert bits % 8 == 0, f"{dtype}{list(shape)} does not fill whole bytes"
    return bits // 8


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def row_ranges(self, rows: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """(offset, length) byte ranges of the given dim-0 rows, in order; adjacent rows merge into one range."""
        row_bytes = self.nbytes // self.shape[0]
        assert row_bytes * self.shape[0] == self.nbytes, "rows must start on byte boundaries"
        return merge_ranges((self.begin + r * row_bytes, row_bytes) for r in rows)


def merge_ranges(ranges) -> tuple[tuple[int, int], ...]:
    """Join (offset, length) ranges where one ends exactly where the next begins: fewer, longer copies."""
    merged: list[list[int]] = []
    for offset, length in ranges:
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1][1] += length
        else:
            merged.append([offset, length])
    return tuple((o, n) for o, n in merged)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] | None


def read_header(path: str | Path) -> Header:
    path = Path(path)
    fix = "re-download or re-convert this shard"
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise SafetensorsError(f"{path} is too short to be a safetensors file; {fix}")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path} has a corrupt header length ({header_len} bytes); {fix}")
        try:
            raw = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path} has a corrupt header ({err}); {fix}") from None
    if not isinstance(raw, dict):
        raise SafetensorsError(f"{path} has a corrupt header (not a JSON object); {fix}")
    metadata = raw.pop("__metadata__", None)
    data_start = 8 + header_len
    tensors = {}
    for name, entry in raw.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = dtype in DTYPE_BITS and all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= begin <= end
            ok = ok and end - begin == tensor_nbytes(dtype, shape)
        except (TypeError, ValueError, KeyError, AssertionError):
            ok = False
        if not ok:
            raise SafetensorsError(f"{path}: header entry {name!r} is malformed ({entry!r}); {fix}")
        if data_start + end > size:
            raise SafetensorsError(f"{path} is truncated ({size} bytes; {name!r} ends at {data_start + end}); {fix}")
        tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    tensors = dict(sorted(tensors.items(), key=lambda item: item[1].begin))
    return Header(path, tensors, metadata)


def read_checkpoint(model: Path) -> tuple[dict | None, dict[str, Header]]:
    """(index JSON or None, {shard filename: header}) of a Hugging Face checkpoint, checked against each other."""
    index_path = model / INDEX_NAME
    if not index_path.exists():
        if not (model / SINGLE_NAME).is_file():
            raise SafetensorsError(f"{model} has neither {INDEX_NAME} nor {SINGLE_NAME}; convert it to safetensors")
        return None, {SINGLE_NAME: read_header(model / SINGLE_NAME)}
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(f, str) for f in weight_map.values())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as err:
        raise SafetensorsError(f"{index_path} is corrupt ({type(err).__name__}: {err}); re-download it") from None
    headers = {}
    for filename in dict.fromkeys(weight_map.values()):
        if not (model / filename).is_file():
            raise SafetensorsError(f"shard {filename} named in {INDEX_NAME} is missing from {model}; re-download it")
        headers[filename] = read_header(model / filename)
    for name, filename in weight_map.items():
        if name not in headers[filename].tensors:
            raise SafetensorsError(f"{INDEX_NAME} puts {name} in {filename}, which lacks it; "
                                   f"re-download the checkpoint")
    return index, headers


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]  # (offset, length) in the source file, concatenated in order

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)


def encode_header(tensors: list[OutTensor], metadata: dict | None) -> bytes:
    entries, offset = {}, 0
    if metadata:
        entries["__metadata__"] = metadata
    for t in tensors:
        assert t.nbytes == tensor_nbytes(t.dtype, t.shape), t.name
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(entries, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads with spaces so the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, buffer: memoryview) -> None:
    """Append `length` bytes of src at `offset` to dst, through `buffer`.

    A buffer that stays in the CPU cache (1 MiB) copied as fast as shutil.copyfile here, whatever the
    offsets; os.copy_file_range was about 40% slower whenever source and destination offsets differ modulo
    the page size, which is the rule once pruned tensors are skipped.
    """
    while length:
        n = os.preadv(src_fd, [buffer[:min(length, len(buffer))]], offset)
        if n == 0:
            raise SafetensorsError(f"source file ended early at offset {offset}; re-download it")
        view = buffer[:n]
        while view:
            view = view[os.write(dst_fd, view):]
        offset += n
        length -= n


def write_shard(dst: Path, src: Path, tensors: list[OutTensor], metadata: dict | None,
                progress: Callable[[int], object] = lambda n: None) -> None:
    """Write `tensors` (byte ranges of `src`) as a new safetensors file `dst` (not fsynced: see prune)."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(src, "rb") as src_file:
            src_fd = src_file.fileno()
            head = encode_header(tensors, metadata)
            while head:
                head = head[os.write(fd, head):]
            buffer = memoryview(bytearray(COPY_BUFFER))
            for offset, length in merge_ranges(r for t in tensors for r in t.ranges):
                for start in range(offset, offset + length, PROGRESS_CHUNK):
                    n = min(PROGRESS_CHUNK, offset + length - start)
                    copy_range(src_fd, fd, start, n, buffer)
                    progress(n)
    finally:
        os.close(fd)


def ranges_digest(path: Path, ranges: tuple[tuple[int, int], ...]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset, length in ranges:
            for start in range(offset, offset + length, COPY_BUFFER):
                digest.update(os.pread(f.fileno(), min(COPY_BUFFER, offset + length - start), start))
    return digest.hexdigest()
