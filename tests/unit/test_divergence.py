"""The divergence rule: the first non-finite step is noted on the device and read when asked; the message
names that step and the optimizers of its phase."""
import math

import torch

from hmtrain.memory import Comm
from hmtrain.train.divergence import Diverged, DivergenceWatch
from tests.unit.test_recipe import recipe


def test_the_first_non_finite_loss_or_gradient_norm_is_the_one_reported():
    watch, comm = DivergenceWatch(torch.device("cpu")), Comm()
    watch.note(1, torch.tensor(5.0), torch.tensor(0.9))
    assert watch.first_bad_step(comm) is None
    watch.note(2, torch.tensor(5.0), torch.tensor(math.nan))
    watch.note(3, torch.tensor(math.inf), torch.tensor(1.0))
    assert watch.first_bad_step(comm) == 2
    later = DivergenceWatch(torch.device("cpu"))
    later.note(7, torch.tensor(-math.inf), torch.tensor(1.0))
    assert later.first_bad_step(comm) == 7


def test_the_message_names_the_step_and_the_phase_optimizers():
    r = recipe("train.cotrain_optim={lr: 1e-4}")
    assert r.optim_keys(r.phase(0)) == ["train.anchor_optim"]
    assert r.optim_keys(r.phase(120)) == ["train.memory_optim", "train.cotrain_optim"]
    text = str(Diverged(3, 10, r.optim_keys(r.phase(120)), None))
    assert "at step 3; stopped at step 10" in text and "no checkpoint was written" in text
    assert "train.memory_optim.lr or train.cotrain_optim.lr" in text
