"""`hmtrain data import dictd` on small dictd dictionaries written here (index + dictzip data)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hmtrain.data.corpus import import_dictd
from hmtrain.data.corpus.import_dictd import decode_number, encode_number
from hmtrain.data.corpus.import_dictd import import_dictd as run_import


def dictzip(data: bytes) -> bytes:
    """A gzip member with dictzip's random-access extra field ("RA": version, chunk length, chunk sizes)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(data) + deflate.flush()
    ra = struct.pack("<HHH", 1, 58315, 1) + struct.pack("<H", len(body))
    extra = b"RA" + struct.pack("<H", len(ra)) + ra
    header = b"\x1f\x8b\x08\x04" + b"\0\0\0\0" + b"\x02\x03" + struct.pack("<H", len(extra)) + extra
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def write_dictionary(directory: Path, name: str, entries: list[tuple[list[str], bytes]], *, utf8: bool = True,
                     compress: bool = True) -> None:
    """entries: (headwords, entry bytes); each headword gets an index line pointing at its entry."""
    data, lines = b"", []
    meta = [(["00-database-info"], b"This file was converted for a test.\n"),
            (["00databaseshort"], b"A test dictionary\n")]
    if utf8:
        meta.append((["00-database-utf8"], b"\n"))
    for headwords, text in meta + entries:
        for headword in headwords:
            lines.append(f"{headword}\t{encode_number(len(data))}\t{encode_number(len(text))}".encode())
        data += text
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.index").write_bytes(b"\n".join(lines) + b"\n")
    if compress:
        (directory / f"{name}.dict.dz").write_bytes(dictzip(data))
    else:
        (directory / f"{name}.dict").write_bytes(data)


ENTRIES = [
    (["apple"], b"apple\n   The fruit of the apple tree.\n"),
    (["'", "apostrophe", "single quote"], b"single quote\n   ASCII character 39.\n"),
    (["bank"], b"bank\n   1. The side of a river.\n"),
    (["bank"], b"bank\n   2. A place that keeps money.\n"),
]


def test_numbers_are_dictd_base64():
    assert [decode_number(s) for s in ("A", "/", "BA", "B0")] == [0, 63, 64, 116]
    for value in (0, 1, 63, 64, 4095, 4096, 10**9):
        assert decode_number(encode_number(value)) == value
    with pytest.raises(ValueError, match="not a dictd base64 digit"):
        decode_number("A=")


@pytest.mark.parametrize("compress", [True, False])
def test_one_document_per_headword_with_all_its_entries(tmp_path: Path, compress: bool):
    write_dictionary(tmp_path / "dictd", "mini", ENTRIES, compress=compress)
    counts = run_import(tmp_path / "out", ["mini"], tmp_path / "dictd")
    assert counts == {"mini": 3}
    rows = pq.read_table(tmp_path / "out" / "mini.parquet").to_pylist()
    assert [r["id"] for r in rows] == ["mini:apple", "mini:'", "mini:bank"]  # metadata skipped, index order
    assert rows[1]["aliases"] == ["apostrophe", "single quote"] and rows[1]["headword"] == "'"
    assert rows[2]["text"] == "bank\n   1. The side of a river.\n\nbank\n   2. A place that keeps money."
    assert {r["dictionary"] for r in rows} == {"mini"}
    first = (tmp_path / "out" / "mini.parquet").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds mini.parquet; pass --overwrite"):
        run_import(tmp_path / "out", ["mini"], tmp_path / "dictd")
    run_import(tmp_path / "out", ["mini"], tmp_path / "dictd", overwrite=True)
    assert (tmp_path / "out" / "mini.parquet").read_bytes() == first  # stable ids and bytes


def test_every_dictionary_in_the_directory_by_default(tmp_path: Path):
    write_dictionary(tmp_path / "dictd", "one", ENTRIES[:1])
    write_dictionary(tmp_path / "dictd", "two", ENTRIES[2:])
    (tmp_path / "dictd" / "orphan.index").write_text("x\tA\tB\n")  # no data file: not a dictionary
    assert run_import(tmp_path / "out", None, tmp_path / "dictd") == {"one": 1, "two": 1}


def test_eight_bit_dictionaries_fall_back_to_windows_1252(tmp_path: Path):
    write_dictionary(tmp_path / "dictd", "old", [(["market"], b"The stock market\x92s drop\n")], utf8=False)
    run_import(tmp_path / "out", ["old"], tmp_path / "dictd")
    texts = pq.read_table(tmp_path / "out" / "old.parquet").column("text").to_pylist()
    assert texts == ["The stock market\u2019s drop"]
    write_dictionary(tmp_path / "dictd", "new", [(["market"], b"The stock market\x92s drop\n")], utf8=True)
    with pytest.raises(ValueError, match=r"new.dict.dz: entry 'market' \(line \d+ of new.index\) is not valid UTF-8"):
        run_import(tmp_path / "out", ["new"], tmp_path / "dictd")


def test_missing_dictionary_names_the_package(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(import_dictd, "DICTD_DIR", tmp_path)
    missing_wn = r"'wn': .*wn.index not found; install it with `apt-get install dict-wn`"
    with pytest.raises(FileNotFoundError, match=missing_wn):
        run_import(tmp_path / "out", ["wn"], tmp_path)
    (tmp_path / "gcide.index").write_text("a\tA\tB\n")
    missing_gcide = r"gcide.dict.dz not found; install it with `apt-get install dict-gcide`"
    with pytest.raises(FileNotFoundError, match=missing_gcide):
        run_import(tmp_path / "out", ["gcide"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no dictd dictionaries .*`apt-get install dict-gcide dict-wn"):
        run_import(tmp_path / "out", None, tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def _break(tmp_path: Path, how: str) -> None:
    write_dictionary(tmp_path, "bad", ENTRIES)
    index, data = tmp_path / "bad.index", tmp_path / "bad.dict.dz"
    lines = index.read_bytes().splitlines()
    if how == "fields":
        lines[4] = b"apple\tA"
    elif how == "digits":
        lines[4] = b"apple\tA*\tB"
    elif how == "past end":
        lines[4] = b"apple\tA\t" + encode_number(10**6).encode()
    elif how == "empty":
        lines = []
    elif how == "truncated":
        data.write_bytes(data.read_bytes()[:-12])
    index.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("how, message", [
    ("fields", r"bad.index: line 5 is not a dictd index line \(expected headword<TAB>offset<TAB>length"),
    ("digits", r"bad.index: line 5: offset b'A\*' / length b'B' are not dictd base64 numbers"),
    ("past end", r"bad.index: line 5: entry 'apple' at bytes \[0, 1000000\) lies past the end of .*bad.dict.dz"),
    ("empty", r"bad.index: the dictd index is empty"),
    ("truncated", r"bad.dict.dz: cannot decompress: truncated or corrupt dictzip file"),
])
def test_a_malformed_dictionary_is_named_and_nothing_is_written(tmp_path: Path, how: str, message: str):
    _break(tmp_path / "dictd", how)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bad.parquet").write_bytes(b"an earlier import")
    with pytest.raises(ValueError, match=message):
        run_import(tmp_path / "out", ["bad"], tmp_path / "dictd", overwrite=True)  # a read failure keeps it
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bad.parquet"]
    assert (tmp_path / "out" / "bad.parquet").read_bytes() == b"an earlier import"
