"""The data stream a checkpoint saves: the position the loader yielded with the last step taken,
continued by a loader of another global batch size after the phase switch."""
import numpy as np

from hmtrain.data.loading.loader import StepLoader
from hmtrain.train.state import Batches
from tests.unit.prepared_helper import leaf_paths, make_prepared


def ids(micro_batches):
    return np.concatenate([mb["index"].numpy() for mb in micro_batches]).tolist()


def test_batches_save_the_yielded_position_and_continue_across_a_batch_size_change(tmp_path):
    data = make_prepared(tmp_path, {leaf: 10 for leaf in leaf_paths([2, 2])}, branching=[2, 2])
    loader = lambda batch: StepLoader(data, "train", global_batch=batch, micro_batches=1, seed=3)  # noqa: E731
    straight = Batches(loader)
    taken = [ids(straight.next(4)) for _ in range(3)] + [ids(straight.next(8)) for _ in range(2)]
    assert straight.state_dict()["position"] == 3 * 4 + 2 * 8

    first = Batches(loader)
    for _ in range(3):
        first.next(4)
    saved = first.state_dict()  # a checkpoint after step 3
    assert saved["epoch"] == 0 and saved["position"] == 12
    resumed = Batches(loader)
    resumed.load_state_dict(saved)
    assert [ids(resumed.next(8)) for _ in range(2)] == taken[3:]
