"""Packing a leaf's documents, segment ids and batch assembly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmtrain.data.format.shards import PackedSequence
from hmtrain.data.loading.batch import PADDING_INDEX, make_batch, pad_batch, padding_batch, real_rows, segment_ids
from hmtrain.data.prepare.pack import pack_leaf
from hmtrain.util.labels import IGNORE_INDEX

EOT, PAD = 1, 0


def _docs(rng: np.random.Generator, n: int) -> list[tuple[str, list[int]]]:
    # Lengths 0..25 so documents both fit, straddle and span several windows.
    return [(f"d{i}", rng.integers(2, 50, size=int(rng.integers(0, 26))).tolist()) for i in range(n)]


@pytest.mark.parametrize("seq_len", [1, 4, 7, 16, 64])
def test_round_trip_reproduces_stream(seq_len: int) -> None:
    docs = _docs(np.random.default_rng(seq_len), 30)
    seqs = list(pack_leaf(docs, path=(2, 9), seq_len=seq_len, eot_id=EOT, pad_id=PAD))
    stream = [t for _, toks in docs if toks for t in (*toks, EOT)]
    got = np.concatenate([s.tokens[: s.num_real] for s in seqs]).tolist()
    assert got == stream
    for s in seqs:
        assert s.tokens.dtype == np.int32 and s.tokens.shape == (seq_len + 1,)
        assert s.path == (2, 9)
    # Only the last sequence may be short, and it is padded with PAD.
    assert all(s.num_real == seq_len + 1 for s in seqs[:-1])
    last = seqs[-1]
    assert (last.tokens[last.num_real :] == PAD).all()
    assert len(seqs) == -(-len(stream) // (seq_len + 1))


def test_doc_ids_follow_split_documents() -> None:
    docs = [("a", [5, 6, 7]), ("b", []), ("c", [8, 9, 10, 11, 12, 13]), ("d", [14])]
    seqs = list(pack_leaf(docs, path=(0,), seq_len=4, eot_id=EOT, pad_id=PAD))
    # stream: 5 6 7 E | 8 9 10 11 12 13 E | 14 E  -> windows of 5
    assert [s.tokens.tolist() for s in seqs] == [
        [5, 6, 7, EOT, 8],
        [9, 10, 11, 12, 13],
        [EOT, 14, EOT, PAD, PAD],
    ]
    assert [s.doc_ids for s in seqs] == [["a", "c"], ["c"], ["c", "d"]]
    assert [s.num_real for s in seqs] == [5, 5, 3]


def test_repeated_doc_id_counts_as_two_documents() -> None:
    seqs = list(pack_leaf([("x", [5]), ("x", [6])], path=(0,), seq_len=8, eot_id=EOT, pad_id=PAD))
    assert seqs[0].doc_ids == ["x", "x"]


def test_exact_fit_has_no_padding_sequence() -> None:
    seqs = list(pack_leaf([("a", [5, 6, 7, 8])], path=(0,), seq_len=4, eot_id=EOT, pad_id=PAD))
    assert len(seqs) == 1 and seqs[0].num_real == 5


def test_pack_leaf_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="must differ"):
        list(pack_leaf([("a", [3])], path=(0,), seq_len=4, eot_id=1, pad_id=1))
    with pytest.raises(ValueError, match="seq_len"):
        list(pack_leaf([("a", [3])], path=(0,), seq_len=0, eot_id=1, pad_id=0))
    with pytest.raises(ValueError, match="'bad'"):
        list(pack_leaf([("bad", [3, -2])], path=(0,), seq_len=4, eot_id=1, pad_id=0))
    with pytest.raises(ValueError, match="path"):
        list(pack_leaf([("a", [3])], path=(), seq_len=4, eot_id=1, pad_id=0))


def test_segment_ids_eot_belongs_to_its_document() -> None:
    tokens = torch.tensor([[5, 6, EOT, 7, EOT, PAD], [EOT, 5, 6, 7, 8, 9]])
    assert segment_ids(tokens, EOT).tolist() == [[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]]


def test_make_batch_two_documents_and_padding() -> None:
    # doc A = 5 6, doc B = 7 8 9, then padding; seq_len = 8.
    tokens = np.array([5, 6, EOT, 7, 8, 9, EOT, PAD, PAD], dtype=np.int32)
    full = np.array([9, 8, 7, 6, 5, 4, 3, 2, 2], dtype=np.int32)  # no EOT, no padding
    batch = make_batch([(tokens, (3, 14)), (full, [1, 4])], eot_id=EOT, pad_id=PAD)
    assert set(batch) == {"tokens", "labels", "segments", "paths"}
    for v in batch.values():
        assert v.dtype == torch.int64
    assert batch["tokens"].tolist() == [[5, 6, EOT, 7, 8, 9, EOT, PAD], [9, 8, 7, 6, 5, 4, 3, 2]]
    X = IGNORE_INDEX
    # After an EOT the next document's first token (7) is not a target: attention cannot see doc A.
    assert batch["labels"].tolist() == [[6, EOT, X, 8, 9, EOT, X, X], [8, 7, 6, 5, 4, 3, 2, 2]]
    assert batch["segments"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0] * 8]
    assert batch["paths"].tolist() == [[3, 14], [1, 4]]


def test_make_batch_keeps_labels_of_pad_id_inside_text() -> None:
    # PAD (0) occurring inside real text is not padding: only the trailing run is.
    tokens = np.array([5, PAD, 6, EOT, PAD], dtype=np.int32)
    batch = make_batch([(tokens, (0,))], eot_id=EOT, pad_id=PAD)
    assert batch["labels"].tolist() == [[PAD, 6, EOT, IGNORE_INDEX]]


def test_make_batch_from_packed_sequences() -> None:
    docs = _docs(np.random.default_rng(0), 12)
    seqs: list[PackedSequence] = list(pack_leaf(docs, path=(1, 5), seq_len=16, eot_id=EOT, pad_id=PAD))
    batch = make_batch([(s.tokens, s.path) for s in seqs], eot_id=EOT, pad_id=PAD)
    n_labels = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    # every real target but those right after an EOT
    assert n_labels == [s.num_real - 1 - int((s.tokens[: s.num_real - 1] == EOT).sum()) for s in seqs]


def test_no_label_crosses_a_document_boundary() -> None:
    docs = _docs(np.random.default_rng(3), 40)
    seqs = list(pack_leaf(docs, path=(0,), seq_len=16, eot_id=EOT, pad_id=PAD))
    batch = make_batch([(s.tokens, s.path) for s in seqs], eot_id=EOT, pad_id=PAD, index=range(len(seqs)))
    full = torch.from_numpy(np.stack([s.tokens for s in seqs]).astype(np.int64))
    segments = segment_ids(full, EOT)  # segment of every input and target position
    trained = batch["labels"] != IGNORE_INDEX
    # A trained target sits in the same document as its input, so attention has seen its context ...
    assert torch.equal(segments[:, 1:][trained], segments[:, :-1][trained])
    # ... and every same-document, non-padding target is trained.
    real = torch.arange(full.shape[1] - 1) < torch.tensor([s.num_real - 1 for s in seqs])[:, None]
    assert torch.equal(trained, real & (segments[:, 1:] == segments[:, :-1]))
    assert batch["index"].tolist() == list(range(len(seqs)))


def test_empty_batch_has_every_field_with_zero_rows() -> None:
    batch = padding_batch(8, 3, PAD)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (0, 8), "labels": (0, 8), "segments": (0, 8), "paths": (0, 3), "index": (0,)}
    assert all(v.dtype == torch.int64 for v in batch.values())


def test_padding_batch_is_padding_that_trains_nothing() -> None:
    batch = padding_batch(4, 2, PAD, rows=1)
    assert batch["tokens"].tolist() == [[PAD] * 4] and batch["labels"].tolist() == [[IGNORE_INDEX] * 4]
    assert batch["segments"].tolist() == [[0] * 4] and batch["paths"].tolist() == [[0, 0]]
    assert batch["index"].tolist() == [PADDING_INDEX] and all(v.dtype == torch.int64 for v in batch.values())


def test_pad_batch_appends_padding_rows_after_the_sequences() -> None:
    docs = _docs(np.random.default_rng(5), 6)
    seqs = list(pack_leaf(docs, path=(0, 1), seq_len=8, eot_id=EOT, pad_id=PAD))[:2]
    batch = make_batch([(s.tokens, s.path) for s in seqs], eot_id=EOT, pad_id=PAD, index=[7, 3])
    padded = pad_batch(batch, 5, PAD)
    assert all(padded[k].shape[0] == 5 and torch.equal(padded[k][:2], batch[k]) for k in batch)
    assert padded["index"].tolist() == [7, 3, PADDING_INDEX, PADDING_INDEX, PADDING_INDEX]
    assert (padded["labels"][2:] == IGNORE_INDEX).all() and real_rows(padded) == 2
    assert pad_batch(batch, 2, PAD) is batch
    with pytest.raises(ValueError, match="3 rows, more than the 2"):
        pad_batch(pad_batch(batch, 3, PAD), 2, PAD)


def test_make_batch_rejects_mismatched_samples() -> None:
    a = np.arange(2, 7, dtype=np.int32)
    with pytest.raises(ValueError, match="same seq_len"):
        make_batch([(a, (0,)), (a[:-1], (0,))], eot_id=EOT, pad_id=PAD)
    with pytest.raises(ValueError, match="depth"):
        make_batch([(a, (0,)), (a, (0, 1))], eot_id=EOT, pad_id=PAD)
    with pytest.raises(ValueError, match="at least one"):
        make_batch([], eot_id=EOT, pad_id=PAD)
