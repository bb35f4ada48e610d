"""An offline tokenizer that is trained on (or chosen for) the data and saved with it.

Three kinds:
- "bpe": byte-level BPE trained with HF `tokenizers` (GPT-2 style: ByteLevel
  pre-tokenizer and decoder), so any text round-trips exactly.
- "byte": the 256 byte values plus EOT and PAD; needs no training, for tests.
- "hf": an open-weight model's own `tokenizer.json` (`model.family=hf`), read from
  its directory with `tokenizers`; EOT is its config.json's eos_token_id, padding its
  pad_token_id. Its name carries the file's sha256, so data prepared with another
  tokenizer is refused by name (`PreparedData.check_compatible`).

Saved as `tokenizer.json` (bpe only) plus `tokenizer_meta.json`, next to the
shards, so training and evaluation always use the tokenizer the data was cut with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
KINDS = ("bpe", "byte", "hf")
META_FILE = "tokenizer_meta.json"
HF_FILE = "tokenizer.json"
FORMAT_VERSION = 1


class Tokenizer:
    """Text <-> token ids. Build with `train_tokenizer` or `Tokenizer.load`."""

    def __init__(self, kind: str, hf_tokenizer=None, *, special: dict | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        self.kind = kind
        self._hf = hf_tokenizer
        if kind == "hf":  # a model's own: its ids and name come with it (`special`: eot_id, pad_id, name)
            if hf_tokenizer is None or special is None:
                raise ValueError("an 'hf' Tokenizer needs a tokenizers.Tokenizer and its eot_id, pad_id and name")
            hf_tokenizer.encode_special_tokens = True
            self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
            self.eot_id, self.pad_id, self.name = int(special["eot_id"]), int(special["pad_id"]), str(special["name"])
        elif kind == "byte":
            self.vocab_size = 258
            self.eot_id = 256
            self.pad_id = 257
            self.name = "byte"
        else:
            if hf_tokenizer is None:
                raise ValueError("a 'bpe' Tokenizer needs a trained tokenizers.Tokenizer")
            eot = hf_tokenizer.token_to_id(EOT_TOKEN)
            pad = hf_tokenizer.token_to_id(PAD_TOKEN)
            if eot is None or pad is None:
                raise ValueError(f"bpe tokenizer lacks the special tokens {EOT_TOKEN!r} and {PAD_TOKEN!r}")
            # Literal "<|endoftext|>" inside a document is ordinary text, never a
            # separator: only the packer inserts EOT ids. (Not serialised, so set here.)
            hf_tokenizer.encode_special_tokens = True
            self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
            self.eot_id = eot
            self.pad_id = pad
            self.name = f"bpe-{self.vocab_size}"

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id}, "
                f"pad_id={self.pad_id})")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOT added: the packer places it between documents)."""
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "byte":
            return [list(t.encode("utf-8")) for t in texts]
        # The Rust side parallelises across texts; much faster than a Python loop.
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}) for {self.name}: {bad[:5]}")
        if self.kind == "byte":
            out = bytearray()
            for i in ids:
                if i == self.eot_id:
                    out += EOT_TOKEN.encode()
                elif i == self.pad_id:
                    out += PAD_TOKEN.encode()
                else:
                    out.append(i)
            # A slice of a sequence can cut a multi-byte character; don't crash on it.
            return out.decode("utf-8", errors="replace")
        # Keep special tokens so decode is the exact inverse of encode.
        return self._hf.decode(ids, skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind in ("bpe", "hf"):
            self._hf.save(str(directory / HF_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "pad_id": self.pad_id,
            "eot_token": EOT_TOKEN,
            "pad_token": PAD_TOKEN,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no tokenizer in {directory}: {META_FILE} is missing")
        try:
            meta = json.loads(meta_path.read_text())
            kind = meta["kind"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{meta_path}: corrupt tokenizer metadata ({e})") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        if kind == "byte":
            tok = cls("byte")
        elif kind in ("bpe", "hf"):
            hf_path = directory / HF_FILE
            if not hf_path.is_file():
                raise FileNotFoundError(f"bpe tokenizer in {directory}: {HF_FILE} is missing")
            from tokenizers import Tokenizer as HFTokenizer

            try:
                hf = HFTokenizer.from_file(str(hf_path))
            except Exception as e:  # the Rust side raises a bare Exception
                raise ValueError(f"{hf_path}: corrupt tokenizer file ({e})") from e
            tok = cls(kind, hf, special=meta if kind == "hf" else None)
        else:
            raise ValueError(f"{meta_path}: unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        for key in ("vocab_size", "eot_id", "pad_id"):
            if meta.get(key) != getattr(tok, key):
                raise ValueError(f"{directory}: {key} is {getattr(tok, key)} but {META_FILE} says {meta.get(key)!r}")
        return tok


def model_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The `tokenizer.json` of an HF model directory (`data.tokenizer=hf`), EOT and padding from its
    config.json; its name is `hf-` and the first 12 hex digits of the file's sha256."""
    import hashlib

    from tokenizers import Tokenizer as HFTokenizer

    from hmtrain.config.hf import hf_shape

    directory = Path(model_dir)
    shape = hf_shape(directory)
    file = directory / HF_FILE
    if not file.is_file():
        raise FileNotFoundError(f"config key 'model.hf_path': {directory} has no {HF_FILE} (data.tokenizer=hf reads "
                                "the model's own tokenizer)")
    try:
        hf = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{file}: corrupt tokenizer file ({e})") from e
    eot, pad = shape.eos_token_id, shape.pad_token_id
    if eot is None or pad is None or eot == pad:
        raise ValueError(f"{directory / 'config.json'}: data.tokenizer=hf needs an eos_token_id and a different "
                         f"pad_token_id (got {eot} and {pad}): documents are packed with EOT between them and "
                         "padded with PAD; add a padding token to the tokenizer and its id to config.json")
    vocab = hf.get_vocab_size(with_added_tokens=True)
    if not (0 <= eot < vocab and 0 <= pad < vocab):
        raise ValueError(f"{directory}: eos_token_id {eot} or pad_token_id {pad} is outside {file.name}'s {vocab} ids")
    name = "hf-" + hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    return Tokenizer("hf", hf, special={"eot_id": eot, "pad_id": pad, "name": name})


def _checked(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"train_tokenizer: text {i} is a {type(text).__name__}, expected str")
        counter[0] += 1
        yield text


def train_tokenizer(texts: Iterable[str], *, kind: str = "bpe", vocab_size: int = 4096) -> Tokenizer:
    """Train a byte-level BPE on `texts` ("bpe") or return the byte tokenizer ("byte").

    The BPE vocabulary may come out smaller than `vocab_size` when the corpus
    has fewer distinct merges; `Tokenizer.vocab_size` is the real size.
    """
    if kind == "byte":
        return Tokenizer("byte")
    if kind != "bpe":  # (an "hf" tokenizer is the model's own: `model_tokenizer`)
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if vocab_size < 258:
        raise ValueError(f"bpe vocab_size must be >= 258 (256 bytes + 2 special tokens), got {vocab_size}")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN, PAD_TOKEN],
        # Every byte in the vocabulary, so unseen characters still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    counter = [0]
    hf.train_from_iterator(_checked(texts, counter), trainer=trainer)
    if counter[0] == 0:
        raise ValueError("train_tokenizer: no texts to train on")
    return Tokenizer("bpe", hf)
