import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmtrain.data.corpus.documents import Document, list_document_files, read_documents


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_reads_all_formats_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"id": "b0", "text": "bee"}, {"id": "b1", "text": "ünïcode ☃"}])
    write_jsonl(tmp_path / "c.jsonl.gz", [{"id": "c0", "text": "sea"}], gz=True)
    write_parquet(tmp_path / "a.parquet", {"id": ["a0", "a1"], "text": ["ay", "aye"]})
    (tmp_path / "notes.txt").write_text("ignored: not a document file")
    files = list_document_files(tmp_path)
    assert [f.name for f in files] == ["a.parquet", "b.jsonl", "c.jsonl.gz"]
    docs = list(read_documents(str(tmp_path)))
    assert [d.id for d in docs] == ["a0", "a1", "b0", "b1", "c0"]
    assert docs[3] == Document(id="b1", text="ünïcode ☃", source=str(tmp_path / "b.jsonl"), index=1)
    assert docs[4].source.endswith("c.jsonl.gz") and docs[4].index == 0


def test_parquet_streams_many_row_groups(tmp_path):
    n = 10_000
    path = write_parquet(tmp_path / "big.parquet", {"text": [f"doc {i}" for i in range(n)]}, row_group_size=1000)
    docs = list(read_documents(path))
    assert len(docs) == n
    assert docs[1234].text == "doc 1234" and docs[1234].index == 1234
    assert docs[1234].id == "big:1234"  # no id column -> file stem + index


def test_glob_and_list_specs(tmp_path):
    write_jsonl(tmp_path / "x1.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "x2.jsonl", [{"text": "two"}])
    write_jsonl(tmp_path / "y.jsonl", [{"text": "three"}])
    assert [f.name for f in list_document_files(str(tmp_path / "x*.jsonl"))] == ["x1.jsonl", "x2.jsonl"]
    docs = list(read_documents([tmp_path / "y.jsonl", tmp_path / "x1.jsonl"]))
    assert [d.id for d in docs] == ["y:0", "x1:0"]


def test_id_fallbacks(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl.gz", [{"id": 7, "text": "a"}, {"text": "b"}], gz=True)
    assert [d.id for d in read_documents(path)] == ["7", "mixed:1"]
    assert [d.id for d in read_documents(path, id_field=None)] == ["mixed:0", "mixed:1"]
    p2 = write_jsonl(tmp_path / "custom.jsonl", [{"body": "hello", "key": "k1"}])
    assert [(d.id, d.text) for d in read_documents(p2, text_field="body", id_field="key")] == [("k1", "hello")]


def test_nothing_matches(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        list_document_files(str(tmp_path / "nothing_here*.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="emptydir"):
        list_document_files(tmp_path / "emptydir")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("id,text\n1,hi\n")
    with pytest.raises(ValueError, match=r"docs\.csv.*unsupported"):
        list(read_documents(path))


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], r"empty\.jsonl: file has no records"),
        (['{"id": "a", "text": "ok"}', '{"id": "b"}'], r"record 1 has no text field 'text'"),
        (['{"id": "a", "text": ""}'], r"record 0: field 'text' must be a non-empty string"),
        (['{"id": "a", "text": "   "}'], r"record 0: field 'text' must be a non-empty string"),
        (['{"id": "a", "text": 5}'], r"record 0: field 'text' must be a non-empty string"),
        (['{"id": "a", "text": "ok"}', '{"text": oops}'], r"line 2 \(record 1\) is not valid JSON"),
        (['["not", "an", "object"]'], r"line 1 \(record 0\) is a JSON list"),
    ],
)
def test_bad_records(tmp_path, lines, message):
    name = "empty.jsonl" if not lines else "bad.jsonl"
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        list(read_documents(path))


def test_bad_record_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", {"id": ["a", "b"], "text": ["fine", None]})
    with pytest.raises(ValueError, match=r"p\.parquet: record 1: field 'text'"):
        list(read_documents(path))
    path = write_parquet(tmp_path / "q.parquet", {"id": ["a"], "body": ["x"]})
    with pytest.raises(ValueError, match=r"q\.parquet: record 0 has no text field 'text'"):
        list(read_documents(path))


def test_non_utf8_reports_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'))
    with pytest.raises(ValueError, match=r"latin\.jsonl\.gz: line 2 is not valid UTF-8"):
        list(read_documents(path))


def test_duplicate_ids_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "one"}, {"id": "dup", "text": "two"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "dup", "text": "three"}])
    with pytest.raises(ValueError, match=r"duplicate document id 'dup'.*b\.jsonl: record 0.*a\.jsonl: record 1"):
        list(read_documents(tmp_path))


def test_truncated_gzip_names_the_file_and_line(tmp_path):
    records = [{"id": f"d{i}", "text": f"document number {i} " * 20} for i in range(200)]
    path = write_jsonl(tmp_path / "docs.jsonl.gz", records, gz=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"docs.jsonl.gz: cannot read past line \d+: truncated or corrupt file"):
        list(read_documents(path))
    path.write_bytes(b"not gzip at all\n")
    with pytest.raises(ValueError, match=r"docs.jsonl.gz: cannot read past line 0"):
        list(read_documents(path))


def test_garbled_parquet_pages_name_the_file(tmp_path):
    path = write_parquet(tmp_path / "docs.parquet", {"id": [f"d{i}" for i in range(100)],
                                                     "text": [f"text {i}" for i in range(100)]}, row_group_size=10)
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the first page header, right after the PAR1 magic
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"docs.parquet: cannot read records from 0 on: corrupt parquet data") as e:
        list(read_documents(path))
    assert "\n" not in str(e.value)  # pyarrow's multi-line message is flattened to one line
