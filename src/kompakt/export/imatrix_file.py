"""llama.cpp importance-matrix files: the GGUF format llama-imatrix writes today and the legacy .dat.

What a file holds, per weight tensor (llama.cpp names, e.g. `blk.0.attn_q.weight`), as llama.cpp's
tools/imatrix/imatrix.cpp and common/imatrix-loader.cpp read and write it:

- GGUF (`general.type = "imatrix"`): `<name>.in_sum2`, F32 [n_mat, n_in] (ggml ne = [n_in, n_mat]),
  the raw Σ x² per input channel; `<name>.counts`, F32 [n_mat, 1], the rows (tokens) summed;
  keys `imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size` (u32), which
  llama-quantize requires. n_mat is 1 for a dense weight, the expert count for MoE.
- legacy .dat (little-endian): int32 n_entries; per entry int32 name length, the name, int32
  ncall, int32 nval, nval float32 = (Σ x² / count) · ncall; then, optionally, int32 chunk count,
  int32 dataset-name length and the name. ncall is the count in chunks (rounded up).

Either way the importance llama-quantize uses is the mean square input, Σ x² / count
(`Entry.importance`). Reading refuses, in one line, a truncated file, a .dat with garbage and
a GGUF that holds no imatrix.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kompakt.atomic import atomic_file
from kompakt.errors import DataError

GGUF_MAGIC = b"GGUF"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
_MAX_NAME = 1 << 12  # longest tensor name a .dat may hold: more means the file is not one


@dataclass
class Entry:
    """One tensor's statistics: sums [n_mat, n_in] (Σ x² per input channel), counts [n_mat] (rows)."""

    sums: np.ndarray
    counts: np.ndarray

    def importance(self) -> np.ndarray:
        """Mean square input per channel [n_mat, n_in]; 1 where nothing was counted (as llama-quantize)."""
        counts = self.counts.astype(np.float64)[:, None]
        mean = self.sums.astype(np.float64) / np.where(counts > 0, counts, 1.0)
        return np.where(counts > 0, mean, 1.0).astype(np.float32)


@dataclass
class Imatrix:
    """An importance matrix: llama.cpp tensor name -> Entry, and where it came from."""

    entries: dict[str, Entry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False  # read from a .dat file (counts are then chunk counts, not tokens)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a llama.cpp imatrix file (GGUF or legacy .dat, told apart by content as llama.cpp does)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"imatrix file {path} does not exist; give the path of a llama-imatrix or kompakt imatrix file")
    with path.open("rb") as handle:
        head = handle.read(4)
    return _read_gguf(path) if head == GGUF_MAGIC else _read_dat(path)


def write_imatrix(imatrix: Imatrix, path: str | Path) -> Path:
    """Write `imatrix` atomically: legacy .dat when the name ends in .dat, else GGUF (llama.cpp's default)."""
    path = Path(path).expanduser().absolute()
    with atomic_file(path) as tmp:
        if path.suffix == ".dat":
            tmp.write_bytes(_dat_bytes(imatrix))
        else:
            _write_gguf(imatrix, tmp)
    return path


def _unreadable(path: Path, why: str) -> DataError:
    return DataError(f"{path} is not a readable llama.cpp imatrix ({why}); recompute it with `kompakt imatrix` or llama-imatrix")


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {name: reader.fields[name].contents() for name in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)
                  if name in reader.fields}  # fmt: skip
        tensors = {t.name: (t.tensor_type, np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as error:
        raise _unreadable(path, f"truncated or corrupt GGUF: {error}") from None
    padded = sum(-(-t.n_bytes // reader.alignment) * reader.alignment for t in reader.tensors)
    if path.stat().st_size < reader.data_offset + padded:  # what llama.cpp's gguf reader refuses
        raise _unreadable(path, f"truncated: {path.stat().st_size} bytes of {reader.data_offset + padded}")
    kind = reader.fields.get("general.type")
    if (kind is not None and kind.contents() != "imatrix") or not any(n.endswith(SUM_SUFFIX) for n in tensors):
        raise _unreadable(path, "a GGUF file without imatrix tensors, perhaps a model")
    entries: dict[str, Entry] = {}
    f32 = gguf.GGMLQuantizationType.F32
    for name, (sums_type, sums) in tensors.items():
        if not name.endswith(SUM_SUFFIX):
            continue
        base = name.removesuffix(SUM_SUFFIX)
        counts_type, counts = tensors.get(base + COUNT_SUFFIX, (None, None))
        if counts is None or sums_type != f32 or counts_type != f32:
            raise _unreadable(path, f"{base} lacks F32 sums and counts")
        n_mat = counts.size
        if n_mat < 1 or sums.size % n_mat:
            raise _unreadable(path, f"{base} has {sums.size} sums for {n_mat} counts")
        entries[base] = Entry(sums.reshape(n_mat, -1), np.rint(counts.reshape(-1)).astype(np.int64))
    if KEY_CHUNK_SIZE not in fields or KEY_DATASETS not in fields:
        raise _unreadable(path, "no imatrix metadata (datasets, chunk size), which llama-quantize requires")
    return Imatrix(entries, list(fields[KEY_DATASETS]), int(fields.get(KEY_CHUNK_COUNT, 0)), int(fields[KEY_CHUNK_SIZE]))


def _write_gguf(imatrix: Imatrix, tmp: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp), arch="")
    writer.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes none: it is not a model
    writer.add_type("imatrix")
    writer.add_array(KEY_DATASETS, list(imatrix.datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
    for name in sorted(imatrix.entries):  # llama.cpp's order: by name
        entry = imatrix.entries[name]
        writer.add_tensor(name + SUM_SUFFIX, np.ascontiguousarray(entry.sums, dtype=np.float32))
        writer.add_tensor(name + COUNT_SUFFIX, entry.counts.astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _dat_bytes(imatrix: Imatrix) -> bytes:
    """The legacy layout, as IMatrixCollector::save_imatrix_legacy writes it."""
    chunk = max(int(imatrix.chunk_size), 1)
    parts = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        entry = imatrix.entries[name]
        counts = entry.counts.astype(np.int64)
        ncall = int((counts.max() + chunk - 1) // chunk)
        per_row = np.repeat(counts, entry.sums.shape[1]).astype(np.float32)
        values = entry.sums.reshape(-1).astype(np.float32)
        values = np.where(per_row > 0, values / np.where(per_row > 0, per_row, 1), 1.0) * np.float32(ncall)
        encoded = name.encode()
        parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, values.size)]
        parts.append(values.astype("<f4").tobytes())
    dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    parts += [struct.pack("<ii", int(imatrix.chunk_count), len(dataset)), dataset]
    return b"".join(parts)


class _Cursor:
    """Reads little-endian values from bytes; running off the end means the file is truncated."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.offset, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.offset + n > len(self.data):
            raise _unreadable(self.path, f"truncated at byte {self.offset} of {len(self.data)}")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.offset


def _read_dat(path: Path) -> Imatrix:
    cursor = _Cursor(path.read_bytes(), path)
    n_entries = cursor.int32()
    # Each entry takes at least 16 bytes: a count larger than that is not an imatrix.
    if n_entries < 1 or n_entries * 16 > cursor.left:
        raise _unreadable(path, f"neither GGUF nor a legacy .dat (it claims {n_entries} entries)")
    entries: dict[str, Entry] = {}
    for index in range(n_entries):
        length = cursor.int32()
        if not 0 < length <= _MAX_NAME:
            raise _unreadable(path, f"entry {index + 1} has a name of {length} bytes")
        try:
            name = cursor.take(length).decode()
        except UnicodeDecodeError:
            raise _unreadable(path, f"entry {index + 1} has a name that is not text") from None
        ncall, nval = cursor.int32(), cursor.int32()
        if nval < 1 or ncall < 0:
            raise _unreadable(path, f"entry {name!r} has {nval} values and {ncall} calls")
        values = np.frombuffer(cursor.take(4 * nval), dtype="<f4").astype(np.float32)
        if not np.isfinite(values).all():
            raise _unreadable(path, f"entry {name!r} holds values that are not finite")
        entries[name] = Entry(values.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if cursor.left:
        chunk_count = cursor.int32()
        if cursor.left:
            length = cursor.int32()
            if length > 0:
                datasets.append(cursor.take(length).decode(errors="replace"))
    if cursor.left:
        raise _unreadable(path, f"{cursor.left} unexpected bytes after the last entry")
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)
