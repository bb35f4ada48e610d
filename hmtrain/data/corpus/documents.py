"""Reading documents from parquet / jsonl / jsonl.gz files.

Every later stage (embedding, routing, tokenising, sharding) consumes the same
`Document` stream, so all validation of the raw input lives here: a bad record
fails with the file and record number instead of surfacing later as a shape
error or a silently skipped document.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    source: str  # file it came from
    index: int  # record number in that file (0-based)


def _suffix(path: Path) -> str | None:
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def list_document_files(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve a file, a directory, a glob, or a list of those into files.

    A directory yields every supported file directly inside it, sorted, so the
    document order (and hence every downstream id and shard) is reproducible.
    """
    if isinstance(spec, (str, Path)):
        specs = [spec]
    else:
        specs = list(spec)
        if not specs:
            raise FileNotFoundError("no document files: the spec list is empty")
    files: list[Path] = []
    for one in specs:
        path = Path(one)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _suffix(p))
        elif path.is_file():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(str(one), recursive=True))]
            found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no document files match {str(one)!r} "
                f"(expected a file, a directory with {', '.join(SUFFIXES)} files, or a glob)"
            )
        files.extend(found)
    return files


def _lines(path: Path, f) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line); a truncated or corrupt compressed stream fails naming the file and line."""
    lineno = 0
    lines = iter(f)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: cannot read past line {lineno}: truncated or corrupt file ({e})") from e
        lineno += 1
        yield lineno, raw


def jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    """JSON objects of a .jsonl / .jsonl.gz file; errors name the file and line."""
    for _lineno, record in numbered_jsonl_records(path):
        yield record


def numbered_jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of a .jsonl / .jsonl.gz file, for callers whose own checks name the line;
    errors name the file and line."""
    opener = gzip.open if _suffix(path) == ".jsonl.gz" else open
    index = 0
    # Read bytes and decode per line so a bad byte is reported with its line.
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise ValueError(f"{path}: cannot open: {e.strerror or e}") from e
    with f:
        for lineno, raw in _lines(path, f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(  # e.msg alone ends mid-sentence ("... starting at")
                    f"{path}: line {lineno} (record {index}) is not valid JSON: {e.msg}: column {e.colno}"
                ) from e
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}: line {lineno} (record {index}) is a JSON {type(record).__name__}, expected an object"
                )
            yield lineno, record
            index += 1


def _text_and_id(where: str, record: dict[str, Any], text_field: str, id_field: str | None,
                 default_id: str) -> tuple[str, str]:
    if text_field not in record:
        raise ValueError(f"{where} has no text field {text_field!r} (fields: {sorted(record)})")
    text = record[text_field]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: field {text_field!r} must be a non-empty string, got {text!r:.60}")
    raw_id = record.get(id_field) if id_field else None
    return text, default_id if raw_id is None else str(raw_id)


def _parquet_batches(path: Path, text_field: str, id_field: str | None, batch_size: int) -> Iterator[list[Document]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise ValueError(f"{path}: cannot read parquet file: {' '.join(str(e).split())}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        if pf.metadata.num_rows == 0:
            raise ValueError(f"{path}: file has no records")
        raise ValueError(f"{path}: record 0 has no text field {text_field!r} (fields: {sorted(names)})")
    columns = [text_field] + ([id_field] if id_field and id_field in names else [])
    # Stream record batches, one column at a time: input files can be far larger than memory.
    batches = pf.iter_batches(batch_size=batch_size, columns=columns)
    stem, source, index = _stem(path), str(path), 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except (OSError, ValueError, pa.ArrowException) as e:  # garbled pages: thrift, decompression, decoding
            raise ValueError(f"{path}: cannot read records from {index} on: corrupt parquet data "
                             f"({' '.join(str(e).split())})") from e
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
        docs = []
        for text, raw_id in zip(texts, ids):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}: record {index}: field {text_field!r} must be a non-empty string, "
                                 f"got {text!r:.60}")
            docs.append(Document(f"{stem}:{index}" if raw_id is None else str(raw_id), text, source, index))
            index += 1
        yield docs
    if index == 0:
        raise ValueError(f"{path}: file has no records")


def _jsonl_batches(path: Path, text_field: str, id_field: str | None, batch_size: int) -> Iterator[list[Document]]:
    stem, source, index = _stem(path), str(path), 0
    docs: list[Document] = []
    for record in jsonl_records(path):
        text, doc_id = _text_and_id(f"{path}: record {index}", record, text_field, id_field, f"{stem}:{index}")
        docs.append(Document(doc_id, text, source, index))
        index += 1
        if len(docs) == batch_size:
            yield docs
            docs = []
    if docs:
        yield docs
    if index == 0:
        raise ValueError(f"{path}: file has no records" + (" (the file is empty)" if _is_empty(path) else ""))


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def read_file(path: str | Path, *, text_field: str = "text", id_field: str | None = "id",
              batch_size: int = 1024) -> Iterator[list[Document]]:
    """The documents of one file, `batch_size` at a time, validated as they are read.

    Ids come from `id_field` when present, else `"{file_stem}:{index}"`. Every error names the file
    and the record (and, for jsonl, the line). Ids are not checked for uniqueness here: that needs
    every file (`read_documents` does it in memory; `hmtrain data prepare` on key hashes).
    """
    path = Path(path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    suffix = _suffix(path)
    if suffix == ".parquet":
        return _parquet_batches(path, text_field, id_field, batch_size)
    if suffix in (".jsonl", ".jsonl.gz"):
        return _jsonl_batches(path, text_field, id_field, batch_size)
    raise ValueError(f"{path}: unsupported file type (supported: {', '.join(SUFFIXES)})")


def read_documents(
    spec: str | Path | Sequence[str | Path],
    *,
    text_field: str = "text",
    id_field: str | None = "id",
) -> Iterator[Document]:
    """Yield every document of `spec` in file order, validating as it goes.

    Ids must be unique across all files because shards and probes refer to them; this checks
    them with an in-memory set (for tools and small corpora: `prepare` streams with `read_file`).
    """
    files = list_document_files(spec)
    for path in files:  # fail on a bad extension before reading anything
        if _suffix(path) is None:
            raise ValueError(f"{path}: unsupported file type (supported: {', '.join(SUFFIXES)})")
    seen: dict[str, tuple[str, int]] = {}
    for path in files:
        for batch in read_file(path, text_field=text_field, id_field=id_field):
            for doc in batch:
                if doc.id in seen:
                    first_src, first_idx = seen[doc.id]
                    raise ValueError(f"duplicate document id {doc.id!r}: {path}: record {doc.index} and "
                                     f"{first_src}: record {first_idx}")
                seen[doc.id] = (str(path), doc.index)
                yield doc
