import json

import pytest

from hmtrain.data.tokenizer import EOT_TOKEN, Tokenizer, train_tokenizer

CORPUS = [f"The quick brown fox number {i} jumps over the lazy dog near the river bank." for i in range(300)] + [
    "Zoë and Søren drank café au lait in Kraków.",
    "日本語のテキストも少し含めます。",
]
SAMPLES = [
    "The quick brown fox.",
    "  leading spaces, trailing tab\t and\nnewlines\n",
    "Zoë Ekström, naïve café, Kraków, Ωμέγα, 日本語, emoji 🎉🚀",
    "unseen characters ☃ ∑ ∮ ʘ",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CORPUS, kind="bpe", vocab_size=400)


def test_bpe_trains_and_round_trips(bpe):
    assert 258 < bpe.vocab_size <= 400
    assert {bpe.eot_id, bpe.pad_id} == {0, 1}
    assert bpe.name == f"bpe-{bpe.vocab_size}"
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    # Merges learned from the corpus make common text shorter than its bytes.
    common = "The quick brown fox jumps over the lazy dog"
    assert len(bpe.encode(common)) < len(common.encode()) / 2


def test_bpe_training_is_deterministic(bpe):
    again = train_tokenizer(CORPUS, kind="bpe", vocab_size=400)
    assert again.vocab_size == bpe.vocab_size
    assert again.encode_batch(SAMPLES) == bpe.encode_batch(SAMPLES)


def test_special_token_text_is_not_a_separator(bpe):
    text = f"before {EOT_TOKEN} after"
    ids = bpe.encode(text)
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == text
    assert bpe.decode([bpe.eot_id]) == EOT_TOKEN


def test_encode_batch_matches_encode(bpe):
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]
    assert bpe.encode_batch([]) == []


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    loaded = Tokenizer.load(tmp_path / "tok")
    assert (loaded.vocab_size, loaded.eot_id, loaded.pad_id, loaded.name) == (
        bpe.vocab_size, bpe.eot_id, bpe.pad_id, bpe.name)
    assert loaded.encode_batch(SAMPLES) == bpe.encode_batch(SAMPLES)
    assert bpe.eot_id not in loaded.encode(EOT_TOKEN)  # setting survives the reload


def test_byte_tokenizer(tmp_path):
    tok = train_tokenizer(["ignored"], kind="byte")
    assert (tok.vocab_size, tok.eot_id, tok.pad_id) == (258, 256, 257)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Aé") == [65, 0xC3, 0xA9]
    assert tok.decode([72, 105, tok.eot_id]) == "Hi" + EOT_TOKEN
    tok.save(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert Tokenizer.load(tmp_path).encode_batch(["ab", "ü"]) == [[97, 98], [0xC3, 0xBC]]


def test_decode_rejects_out_of_range(bpe):
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([bpe.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        Tokenizer("byte").decode([-1])


def test_train_errors():
    with pytest.raises(ValueError, match="bpe, byte"):
        train_tokenizer(CORPUS, kind="wordpiece")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer(iter([]), vocab_size=300)
    with pytest.raises(ValueError, match="text 1 is a int"):
        train_tokenizer(["ok", 5], vocab_size=300)


def test_load_errors(bpe, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_meta.json"):
        Tokenizer.load(tmp_path / "missing")
    d = tmp_path / "corrupt"
    bpe.save(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt tokenizer file"):
        Tokenizer.load(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(d)
    (d / "tokenizer_meta.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="corrupt tokenizer metadata"):
        Tokenizer.load(d)
    meta = {"format_version": 1, "kind": "byte", "vocab_size": 999, "eot_id": 256, "pad_id": 257}
    (d / "tokenizer_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.load(d)
