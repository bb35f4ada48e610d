import pytest
import torch

from hmtrain.data.routing.embed import Embedder, HashingEmbedder, build_embedder, embed_texts

TEXTS = [
    "The cat sat on the warm mat by the fire.",
    "A cat was sitting on the warm mat near the fire.",
    "Quarterly revenue of the shipping company rose by four percent.",
]


def test_hashing_shape_norm_and_similarity():
    emb = HashingEmbedder(dim=128)
    assert isinstance(emb, Embedder)
    v = emb.embed(TEXTS)
    assert v.shape == (3, 128) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_hashing_is_deterministic_and_case_insensitive():
    a = HashingEmbedder(dim=64).embed(["Hello world", "hello WORLD", "other words"])
    b = HashingEmbedder(dim=64).embed(["Hello world", "hello WORLD", "other words"])
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], a[2])


def test_hashing_stable_across_processes():
    # Python's hash() is salted per process; the embedder must not depend on it.
    import subprocess
    import sys
    from pathlib import Path

    import hmtrain

    root = str(Path(hmtrain.__file__).resolve().parents[1])

    code = ("from hmtrain.data.routing.embed import HashingEmbedder; "
            "print(HashingEmbedder(32).embed(['alpha beta'])[0].tolist())")
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PYTHONPATH": root}).stdout
        for seed in (1, 2)
    }
    assert len(outs) == 1


def test_hashing_empty_text_is_unit():
    v = HashingEmbedder(dim=16).embed(["", "!!!"])
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))


def test_build_embedder_errors():
    with pytest.raises(ValueError, match="minilm, hashing"):
        build_embedder("word2vec")
    with pytest.raises(ValueError, match="dim"):
        build_embedder("minilm", dim=128)
    with pytest.raises(ValueError, match="dim"):
        HashingEmbedder(dim=1)
    assert build_embedder("hashing", dim=32).dim == 32


def test_embed_texts_batches_match_single_call():
    emb = build_embedder("hashing", dim=64)
    texts = [f"document number {i} about topic {i % 3}" for i in range(23)]
    out = embed_texts(emb, texts, batch_size=5, progress=False)
    assert out.shape == (23, 64)
    assert torch.equal(out, emb.embed(texts))
    assert embed_texts(emb, [], progress=False).shape == (0, 64)
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(emb, texts, batch_size=0)


def test_embed_texts_checks_embedder_output():
    class Broken:
        name, dim = "broken", 8

        def embed(self, texts):
            return torch.zeros(len(texts), 4)

    with pytest.raises(ValueError, match="broken.*expected"):
        embed_texts(Broken(), ["a", "b"], progress=False)


@pytest.fixture(scope="module")
def minilm():
    return build_embedder("minilm", device="cpu")


def test_minilm_small(minilm):
    assert minilm.name == "minilm" and minilm.dim == 384
    v = embed_texts(minilm, TEXTS, batch_size=2, progress=False)
    assert v.shape == (3, 384) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert v[0] @ v[1] > 0.7
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


class TinyPlugin:
    """A plug-in embedder: any class with name, dim and embed, built with the device."""

    name = "tiny-plugin"
    dim = 4

    def __init__(self, device: str = "cpu"):
        self.device = device

    def embed(self, texts):
        return torch.nn.functional.normalize(torch.ones(len(texts), self.dim), dim=1)


def test_plugin_embedders_are_built_by_module_and_class():
    emb = build_embedder("tests.unit.test_embed:TinyPlugin", device="cpu")
    assert isinstance(emb, TinyPlugin) and emb.device == "cpu"
    assert embed_texts(emb, ["a", "b", "c"], batch_size=2, progress=False).shape == (3, 4)
    with pytest.raises(ValueError, match="cannot import Nope"):
        build_embedder("tests.unit.test_embed:Nope")
    with pytest.raises(ValueError, match="has no 'embed'"):
        build_embedder("tests.unit.test_embed:NotAnEmbedder")


class NotAnEmbedder:
    name, dim = "x", 2

    def __init__(self, device: str = "cpu"):
        pass
