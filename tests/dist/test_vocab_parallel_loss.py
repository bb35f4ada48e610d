"""The vocabulary-parallel loss on 2 gloo ranks equals the whole head's (tests/dist/vocab_loss_worker.py)."""
import json

import pytest

from tests.dist.conftest import REPO, torchrun

pytestmark = pytest.mark.timeout(300)


def test_the_vocabulary_parallel_loss_equals_the_whole_heads_on_2_ranks(tmp_path):
    torchrun(2, [str(REPO / "tests" / "dist" / "vocab_loss_worker.py"), str(tmp_path)], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == 6 and ranks[0] == ranks[1]  # every case checked, the loss the same on both ranks
