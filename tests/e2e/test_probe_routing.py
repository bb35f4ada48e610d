"""`eval.probe_routing` on the session's synthetic corpus: probes routed by their question (the default and
the paper's), by their prompt (the context), or by the oracle path of their person's training documents."""
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from hmtrain.config import load_config
from hmtrain.data.corpus.probes import load_probes
from hmtrain.data.format.prepared import PreparedData
from hmtrain.data.routing.embed import build_embedder, embed_texts
from hmtrain.data.routing.questions import route_probes
from hmtrain.eval.evaluate import evaluate, to_markdown
from tests.e2e.conftest import run_cli


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("probe_routing")
    run_cli("train", "--config", "tiny", *prepared["overrides"], "train.pretrain_steps=2", "train.memory_steps=2",
            "train.checkpoint_every=2", "logging.mlflow=false", f"train.run_dir={work / 'memory'}", cwd=work)
    return {**prepared, "run": work / "memory"}


def corpus(prepared: dict) -> tuple[PreparedData, list[dict]]:
    root = Path(prepared["root"])
    return PreparedData.open(root / "prepared"), load_probes(root / "corpus" / "probes.jsonl", limit=40)


def agreement_before_the_oracle(data: PreparedData, probes: list[dict], paths: torch.Tensor) -> dict[str, float]:
    """The figure eval reported before eval.probe_routing: at each level on its own, how often a probe lands
    on the node most of its person's documents (train and held-out alike) were routed to."""
    table = data.documents(["id", "path"]).to_pydict()
    doc_path = dict(zip(table["id"], table["path"]))
    hits = Counter()
    for probe, routed in zip(probes, paths.tolist()):
        doc_paths = [doc_path[d] for d in probe["doc_ids"]]
        for level in range(len(routed)):
            hits[level] += routed[level] == Counter(p[level] for p in doc_paths).most_common(1)[0][0]
    return {f"level{level + 1}": hits[level] / len(probes) for level in range(paths.shape[1])}


def test_each_routing_scores_the_probes_and_names_itself(trained):
    data, probes = corpus(trained)
    assert load_config("tiny").eval.probe_routing == "question"  # the default: today's routing, unchanged
    results = {}
    for routing in ("question", "context", "oracle"):
        cfg = load_config("tiny", [*trained["overrides"], f"eval.probe_routing={routing}", "logging.mlflow=false"])
        results[routing] = evaluate(cfg, trained["run"], device="cpu", progress=False)
        assert results[routing]["probe_routing"] == routing
        assert f"Probes routed by {routing} (" in to_markdown(results[routing])
        for row in results[routing]["rows"]:
            assert round(row["probe_accuracy"]["all"] * 40) == row["probe_accuracy"]["all"] * 40
    assert results["oracle"]["routing_agreement"] == {"level1": 1.0, "level2": 1.0}
    question_paths = route_probes(data, probes, progress=False, device="cpu").paths
    assert results["question"]["routing_agreement"] == agreement_before_the_oracle(data, probes, question_paths)
    # the anchor alone reads no memory: its score is the same under every routing
    alone = [r["rows"][2]["probe_accuracy"] for r in results.values()]
    assert alone[0] == alone[1] == alone[2]


def test_text_routings_embed_the_question_or_the_prompt(prepared):
    data, probes = corpus(prepared)
    embedder = build_embedder(data.manifest["embedder"], device="cpu")
    for routing, field in (("question", "question"), ("context", "prompt")):
        expected = data.tree.route(embed_texts(embedder, [p[field] for p in probes], progress=False))
        probe_set = route_probes(data, probes, routing=routing, progress=False, device="cpu")
        assert probe_set.routing == routing and torch.equal(probe_set.paths, expected)
    question = route_probes(data, probes, routing="question", progress=False, device="cpu").paths
    context = route_probes(data, probes, routing="context", progress=False, device="cpu").paths
    assert (question != context).any(), "the fixture should hold probes whose prompt routes elsewhere"


def test_oracle_route_is_the_majority_path_of_the_persons_training_documents(prepared):
    """Hand-computed from the corpus's own person field, not the probes' doc_ids."""
    root = Path(prepared["root"])
    data, _ = corpus(prepared)
    probes = load_probes(root / "corpus" / "probes.jsonl")  # all of them: the oracle embeds nothing
    table = data.documents(["id", "split", "path"]).to_pydict()
    routed = {i: (s, tuple(p)) for i, s, p in zip(table["id"], table["split"], table["path"])}
    by_person: dict[int, list[tuple]] = {}
    with gzip.open(root / "corpus" / "documents.jsonl.gz", "rt") as f:
        for line in f:
            doc = json.loads(line)
            split, path = routed[doc["id"]]
            if split == "train":
                by_person.setdefault(doc["person"], []).append(path)
    oracle = route_probes(data, probes, routing="oracle", progress=False).paths.tolist()
    checked = spread = 0
    for probe, path in zip(probes, oracle):
        counts = Counter(by_person.get(probe["person"], [])).most_common()
        if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
            continue  # no training document, or a tie: the unit test covers its rule
        assert tuple(path) == counts[0][0], probe["id"]
        checked += 1
        spread += len(counts) > 1
    assert checked >= 150 and spread >= 5, (checked, spread)  # some majorities over documents on several paths


def test_oracle_routing_refuses_probes_whose_documents_are_not_in_the_data(prepared):
    data, probes = corpus(prepared)
    stranger = {**probes[0], "id": "probe-stranger", "doc_ids": ["doc-not-prepared"]}
    with pytest.raises(ValueError, match="probe 'probe-stranger'.*doc_ids"):
        route_probes(data, [probes[1], stranger], routing="oracle", progress=False)
