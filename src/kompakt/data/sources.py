"""Read user text for calibration and training: plain text, JSON lines, Parquet, saved HF datasets.

Every reader returns a list of documents (strings). Chat data (records with a "messages" list
of {role, content}) is rendered with the model's chat template, so calibration sees the same
token stream the model sees when it chats. Nothing here unpickles: Parquet and Arrow are read
as columns, a saved dataset directory must hold only Arrow and JSON files.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kompakt.errors import DataError

logger = logging.getLogger(__name__)

# .raw / .tokens: the WikiText files (plain text) that benchmarks read.
TEXT_SUFFIXES = frozenset({".txt", ".md", ".text", ".rst", ".raw", ".tokens"})
JSONL_SUFFIXES = frozenset({".jsonl", ".json"})
PARQUET_SUFFIXES = frozenset({".parquet"})
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES
_DATASET_MARKERS = ("state.json", "dataset_dict.json")  # written by datasets' save_to_disk
_SNIFF_BYTES = 8192
_WHAT_TO_PASS = "a .txt/.md, .jsonl, .parquet file, a directory of them, or a saved Hugging Face dataset"


def read_texts(
    path: str | Path | Sequence[str | Path],
    *,
    tokenizer: Any = None,
    text_field: str = "text",
) -> list[str]:
    """Read the documents in `path` (a file, a directory, or a list of paths).

    Args:
        path: .txt/.md (one document per file), .jsonl/.json (one record per line, with
            `text_field` or "messages"), .parquet (a `text_field` or "messages" column),
            a directory of such files (read recursively, in sorted order), or a directory
            written by `datasets.Dataset.save_to_disk`.
        tokenizer: renders chat records with its chat template; needed for chat data only.
        text_field: the field / column holding plain text.

    Returns:
        The non-empty documents, in file order.

    Raises:
        DataError: missing path, empty or binary file, unknown extension, malformed records.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise DataError(f"no data paths given; pass {_WHAT_TO_PASS}")
    texts: list[str] = []
    for item in paths:
        texts.extend(_read_one(Path(item).expanduser(), tokenizer, text_field))
    if not texts:
        raise DataError(f"{', '.join(str(p) for p in paths)} holds no text; pass a file with text in it")
    return texts


def _read_one(path: Path, tokenizer: Any, text_field: str) -> list[str]:
    if not path.exists():
        raise DataError(f"data path {path} does not exist; pass {_WHAT_TO_PASS}")
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DATASET_MARKERS):
            return _read_hf_dataset(path, tokenizer, text_field)
        return _read_directory(path, tokenizer, text_field)
    return _read_file(path, tokenizer, text_field)


def _read_directory(directory: Path, tokenizer: Any, text_field: str) -> list[str]:
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in KNOWN_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise DataError(
            f"{directory} holds no .txt/.md/.raw/.jsonl/.parquet files; put the text files there or pass one file"
        )
    texts: list[str] = []
    for file in files:
        texts.extend(_read_file(file, tokenizer, text_field, skip_empty=True))
    return texts


def _read_file(path: Path, tokenizer: Any, text_field: str, *, skip_empty: bool = False) -> list[str]:
    """Documents of one file; an empty file is an error unless it is one of a directory's."""
    suffix = path.suffix.lower()
    if suffix not in KNOWN_SUFFIXES:
        raise DataError(
            f"{path}: unknown data format {suffix or '(no extension)'!r}; "
            f"use .txt/.md/.raw, .jsonl/.json, .parquet or a saved Hugging Face dataset directory"
        )
    if suffix in PARQUET_SUFFIXES and path.stat().st_size > 0:
        return _read_parquet(path, tokenizer, text_field)
    content = _decode_text(path)
    if not content.strip():
        if skip_empty:
            logger.warning("skipping empty file %s", path)
            return []
        raise DataError(f"{path} is empty; pass a file with text in it")
    if suffix in TEXT_SUFFIXES:
        return [content]
    return _parse_json_records(content, path, tokenizer, text_field)


def _decode_text(path: Path) -> str:
    """The file as UTF-8 text; binary files are refused from their first bytes."""
    raw = path.read_bytes()
    head = raw[:_SNIFF_BYTES]
    if b"\x00" in head:
        raise DataError(f"{path} looks binary (NUL bytes), not text; pass a UTF-8 text, .jsonl or .parquet file")
    try:
        # Incremental decode: a multi-byte character cut at the sniff boundary is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (undecodable byte at offset {exc.start}); "
            f"pass a text file or convert it (iconv -t UTF-8)"
        ) from None
    try:
        # Universal newlines, as Python's text mode reads files: Windows line endings must not
        # change the tokens (WikiText-2 test ships with \r\n; BENCH's anchors read it in text mode).
        return raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {exc.start}); convert it with iconv -t UTF-8"
        ) from None


def _parse_json_records(content: str, path: Path, tokenizer: Any, text_field: str) -> list[str]:
    """JSON lines (or, for a .json file, one JSON array of records)."""
    stripped = content.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
        return _records_to_texts(((i + 1, r) for i, r in enumerate(records)), path, "record", tokenizer, text_field)
    return _records_to_texts(_json_lines(content, path), path, "line", tokenizer, text_field)


def _json_lines(content: str, path: Path) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg}); fix or remove that line") from None


def _records_to_texts(
    records: Iterable[tuple[int, Any]], path: Path, unit: str, tokenizer: Any, text_field: str
) -> list[str]:
    """Texts from records; the first record decides plain (`text_field`) or chat ("messages")."""
    texts: list[str] = []
    chat: bool | None = None
    for number, record in records:
        where = f"{path} {unit} {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with {text_field!r} or 'messages'; fix that {unit}")
        if chat is None:
            chat = text_field not in record and "messages" in record
        if chat:
            if "messages" not in record:
                raise DataError(f"{where}: chat record without 'messages'; give every {unit} a 'messages' list")
            texts.append(render_chat(record["messages"], tokenizer, where))
            continue
        value = record.get(text_field)
        if not isinstance(value, str):
            raise DataError(
                f"{where}: no string {text_field!r} field (keys: {', '.join(map(str, record)) or 'none'}); "
                f"give every {unit} a {text_field!r} string or a 'messages' list"
            )
        if value.strip():
            texts.append(value)
    if chat is None:
        raise DataError(f"{path} holds no records; pass a file with one JSON object per line")
    return texts


def render_chat(messages: Any, tokenizer: Any, where: str) -> str:
    """One conversation as text, rendered with the tokenizer's chat template."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects; fix that record")
    clean: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = _content_text(message.get("content")) if isinstance(message, dict) else None
        if not isinstance(role, str) or content is None:
            raise DataError(
                f"{where}: message {index} is not a {{'role': str, 'content': str}} object; fix that record"
            )
        clean.append({"role": role, "content": content})
    if tokenizer is None:
        raise DataError(f"{where}: chat data needs the model's tokenizer to render it; pass tokenizer=")
    if not getattr(tokenizer, "chat_template", None):
        # A base model has no chat format; its natural input is the plain text of the turns.
        logger.debug("tokenizer has no chat template; joining message contents as plain text")
        return "\n\n".join(m["content"] for m in clean)
    try:
        return tokenizer.apply_chat_template(clean, tokenize=False)
    except Exception as exc:  # template errors (e.g. roles not alternating) are data problems
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{where}: the chat template rejected this conversation ({message}); fix that record") from None


def _content_text(content: Any) -> str | None:
    """Message content as a string; multimodal-style lists of {type: text, text} parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _column_texts(names: Sequence[str], column: Any, where: str, tokenizer: Any, text_field: str) -> list[str]:
    """Texts from a columnar source; `column(name)` returns that column as a Python list."""
    if text_field in names:
        return [value for value in column(text_field) if isinstance(value, str) and value.strip()]
    if "messages" in names:
        return [render_chat(m, tokenizer, f"{where} row {i}") for i, m in enumerate(column("messages"))]
    raise DataError(
        f"{where} has no {text_field!r} or 'messages' column (columns: {', '.join(names)}); "
        f"rename the text column to {text_field!r}"
    )


def _read_parquet(path: Path, tokenizer: Any, text_field: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable Parquet file ({exc}); pass a valid .parquet file") from None
    names = parquet.schema_arrow.names
    return _column_texts(names, lambda name: parquet.read(columns=[name]).column(0).to_pylist(), str(path),
                         tokenizer, text_field)


def _read_hf_dataset(directory: Path, tokenizer: Any, text_field: str) -> list[str]:
    """A `save_to_disk` directory: Arrow data and JSON metadata only, read with datasets.load_from_disk."""
    unexpected = [
        p for p in directory.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix not in (".arrow", ".json")
    ]
    if unexpected:
        raise DataError(
            f"{directory} holds {unexpected[0].name}, which is not Arrow or JSON; kompakt reads only "
            f"datasets saved with save_to_disk (Arrow) and never unpickles — remove that file"
        )
    import datasets

    try:
        dataset = datasets.load_from_disk(str(directory))
    except Exception as exc:  # corrupt metadata, missing shards, ...
        raise DataError(f"{directory} is not a readable saved dataset ({exc}); re-save it with save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        splits = ["train"] if "train" in dataset else sorted(dataset)
        logger.info("reading split(s) %s of %s", ", ".join(splits), directory)
        texts: list[str] = []
        for split in splits:
            part = dataset[split]
            texts.extend(_column_texts(part.column_names, part.__getitem__, f"{directory}[{split}]",
                                       tokenizer, text_field))
        return texts
    return _column_texts(dataset.column_names, dataset.__getitem__, str(directory), tokenizer, text_field)
