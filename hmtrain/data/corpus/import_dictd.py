"""`hmtrain data import dictd`: Debian's dictd dictionaries as documents (real English text).

A dictd dictionary NAME is two files, by default in /usr/share/dictd (`apt-get install dict-gcide
dict-wn dict-foldoc dict-jargon dict-elements`):
  NAME.index    one line per headword: `headword<TAB>offset<TAB>length`, the numbers in dictd's
                base64 (digits A-Z a-z 0-9 + /, most significant first), into the uncompressed data
  NAME.dict.dz  the entries, back to back, gzip-compressed with dictzip's random-access extra field
                (plain gzip decompression of the whole file reads it); or NAME.dict, uncompressed

One document per headword: its entries (a headword may have several, e.g. gcide's homographs), in
file order, joined by a blank line. Headwords whose entries are exactly the same (synonyms pointing
at one entry, as FOLDOC's "'" and "apostrophe") make one document, not copies: its id is the first
such headword in index order, the rest are listed in `aliases`. Ids are `NAME:headword`, stable
across imports. The dictionary's own metadata (headwords 00-database-*, 00database*, 00-NAME-*)
is skipped.

Text: entries of a dictionary that declares UTF-8 (a 00-database-utf8 headword) must be UTF-8;
older 8-bit dictionaries (gcide, elements) are read as UTF-8 where valid and as Windows-1252 /
Latin-1 otherwise, the encodings their stray bytes come from.

Output: DIR/NAME.parquet per dictionary, columns id, text, dictionary, headword, aliases; written
under a temporary name and renamed, so a failed import leaves earlier files as they were.
"""
from __future__ import annotations

import gzip
import logging
import zlib
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hmtrain.util.files import atomic_write, check_output_dir

log = logging.getLogger(__name__)

DICTD_DIR = Path("/usr/share/dictd")
PACKAGES = {"gcide": "dict-gcide", "wn": "dict-wn", "foldoc": "dict-foldoc", "jargon": "dict-jargon",
            "elements": "dict-elements", "vera": "dict-vera", "devil": "dict-devil"}
ALL_PACKAGES = "dict-gcide dict-wn dict-foldoc dict-jargon dict-elements"
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DIGIT = {c: i for i, c in enumerate(B64)}


def decode_number(text: str) -> int:
    """A dictd base64 number ("B0" -> 52); ValueError on any other character."""
    if not text:
        raise ValueError("empty number")
    value = 0
    for ch in text:
        if ch not in _DIGIT:
            raise ValueError(f"{ch!r} is not a dictd base64 digit")
        value = value * 64 + _DIGIT[ch]
    return value


def encode_number(value: int) -> str:
    if value < 0:
        raise ValueError(f"dictd numbers are >= 0, got {value}")
    digits = B64[value % 64]
    while value >= 64:
        value //= 64
        digits = B64[value % 64] + digits
    return digits


def _package(name: str) -> str:
    return PACKAGES.get(name, f"dict-{name}")


def _is_metadata(headword: str, name: str) -> bool:
    return headword.startswith(("00-database-", "00database", f"00-{name}-")) or headword == "00-web1913-info"


def read_index(path: Path) -> list[tuple[bytes, int, int, int]]:
    """(headword bytes, offset, length, line number) of every line of a .index file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the dictd index: {e.strerror or e}") from e
    out = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(b"\t")
        if len(fields) != 3:
            raise ValueError(f"{path}: line {lineno} is not a dictd index line (expected headword<TAB>offset<TAB>"
                             f"length, got {len(fields)} tab-separated fields): {line[:80]!r}")
        try:
            offset, length = (decode_number(f.decode("ascii")) for f in fields[1:])
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: line {lineno}: offset {fields[1][:20]!r} / length {fields[2][:20]!r} are not "
                             f"dictd base64 numbers ({e})") from e
        out.append((fields[0], offset, length, lineno))
    if not out:
        raise ValueError(f"{path}: the dictd index is empty")
    return out


def read_data(path: Path) -> bytes:
    """The uncompressed entries of NAME.dict.dz (or a plain NAME.dict)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    if not path.name.endswith(".dz"):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress: truncated or corrupt dictzip file ({e})") from e


def _decode(entry: bytes, utf8_only: bool, where: str) -> str:
    try:
        return entry.decode("utf-8")
    except UnicodeDecodeError as e:
        if utf8_only:
            raise ValueError(f"{where} is not valid UTF-8 ({e.reason} at byte {e.start}), though the dictionary "
                             "declares UTF-8") from e
    try:
        return entry.decode("cp1252")
    except UnicodeDecodeError:
        return entry.decode("latin-1")


def dictionary_files(name: str, directory: Path = DICTD_DIR) -> tuple[Path, Path]:
    """(index, data) of dictionary `name`; FileNotFoundError naming the package to install."""
    directory = Path(directory)
    index = directory / f"{name}.index"
    data = next((p for p in (directory / f"{name}.dict.dz", directory / f"{name}.dict") if p.is_file()), None)
    missing = index if not index.is_file() else directory / f"{name}.dict.dz" if data is None else None
    if missing is not None:
        package = (f"`apt-get install {PACKAGES[name]}`" if name in PACKAGES else
                   f"its Debian package (usually `apt-get install dict-{name}`; these exist: {ALL_PACKAGES})")
        hint = (f"install it with {package}" if directory == DICTD_DIR
                else f"check --dir, or install it with {package} and use --dir {DICTD_DIR}")
        raise FileNotFoundError(f"dictd dictionary {name!r}: {missing} not found; {hint}")
    return index, data


def dictionary_documents(name: str, directory: Path = DICTD_DIR) -> dict[str, list]:
    """Columns id, text, dictionary, headword, aliases of one dictionary's documents."""
    index_path, data_path = dictionary_files(name, directory)
    lines = read_index(index_path)
    data = read_data(data_path)
    utf8_only = any(h in (b"00-database-utf8", b"00databaseutf8") for h, *_ in lines)
    entries: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for head, offset, length, lineno in lines:
        headword = _decode(head, utf8_only, f"{index_path}: line {lineno}: headword").strip()
        if _is_metadata(headword, name):
            continue
        if offset + length > len(data):
            raise ValueError(f"{index_path}: line {lineno}: entry {headword!r} at bytes [{offset}, {offset + length}) "
                             f"lies past the end of {data_path} ({len(data)} bytes uncompressed): the index does "
                             "not belong to this data, or the data is truncated")
        if (offset, length) not in [(o, n) for o, n, _ in entries[headword]]:
            entries[headword].append((offset, length, lineno))
    by_entries: dict[tuple, list[str]] = {}
    for headword, spans in entries.items():  # dicts keep index order
        by_entries.setdefault(tuple(sorted((o, n) for o, n, _ in spans)), []).append(headword)
    columns: dict[str, list] = {"id": [], "text": [], "dictionary": [], "headword": [], "aliases": []}
    for spans, headwords in by_entries.items():
        first = headwords[0]
        line_of = {(o, n): line for o, n, line in entries[first]}
        texts = [_decode(data[o : o + n], utf8_only, f"{data_path}: entry {first!r} (line {line_of[(o, n)]} of "
                                                     f"{index_path.name})").strip() for o, n in spans]
        text = "\n\n".join(t for t in texts if t)
        if not text:
            continue
        columns["id"].append(f"{name}:{first}")
        columns["text"].append(text)
        columns["dictionary"].append(name)
        columns["headword"].append(first)
        columns["aliases"].append(headwords[1:])
    if not columns["id"]:
        raise ValueError(f"{index_path}: no entries besides the dictionary's metadata")
    return columns


def available(directory: Path = DICTD_DIR) -> list[str]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name[: -len(".index")] for p in directory.glob("*.index")
                  if (directory / (p.name[: -len(".index")] + ".dict.dz")).is_file()
                  or (directory / (p.name[: -len(".index")] + ".dict")).is_file())


def import_dictd(out: Path, names: list[str] | None = None, directory: Path = DICTD_DIR,
                 overwrite: bool = False) -> dict[str, int]:
    """Write OUT/NAME.parquet for each dictionary (all found in `directory` when none are named);
    return documents per dictionary. Every dictionary is read before anything is written, and an
    existing NAME.parquet is replaced only with `overwrite`."""
    out, directory = Path(out), Path(directory)
    check_output_dir(out, "--out")
    if not names:
        names = available(directory)
        if not names:
            raise FileNotFoundError(f"no dictd dictionaries (NAME.index + NAME.dict.dz) in {directory}; install "
                                    f"some with `apt-get install {ALL_PACKAGES}`")
    for name in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"dictd dictionary name {name!r}: expected a bare name such as 'wn' or 'gcide'")
        dictionary_files(name, directory)  # every file present before the long reads
    existing = [f"{name}.parquet" for name in names if (out / f"{name}.parquet").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace "
                              "them, or choose another --out")
    tables = {name: pa.table(dictionary_documents(name, directory)) for name in names}
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        final = out / f"{name}.parquet"
        with atomic_write(final) as f:
            pq.write_table(table, f)
        log.info("%s: %d documents from %s", final, table.num_rows, directory / f"{name}.index")
    return {name: table.num_rows for name, table in tables.items()}
