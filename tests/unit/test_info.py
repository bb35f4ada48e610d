"""`hmtrain info`: bytes per rank for anchor, bank rows, optimizer state and traffic, by hand."""
import pytest
from rich.console import Console

from hmtrain.config import load_config
from hmtrain.info import anchor_bytes_per_rank, print_info
from hmtrain.memory.sizes import rank_footprint


def test_rank_footprint_by_hand():
    # 2 levels: 4 nodes x 2 units (replicated), 16 nodes x 1 unit (sharded over 4 ranks); 1 layer, d 8
    f = rank_footprint(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4,
                       replicate_levels=1, generic=False, weight_bytes=2, micro_batch=2, global_batch=8)
    row0, row1 = 3 * 8 * 2, 3 * 8 * 1  # parameters per row of each level
    assert f.weights == (4 * row0 + 4 * row1) * 2  # all of level 0, a quarter of level 1, in bf16
    # ZeRO-1: the replicated level's fp32 masters, moments and step counts for its own chunk row only
    assert f.masters == (1 * row0 + 4 * row1) * 4
    assert f.optimizer == 1 * (row0 * 8 + 8) + 4 * (row1 * 8 + 8)  # fp32 moments + an int64 step per row
    assert f.step_grads == (4 * row0 + 4 * row1) * 4  # at most min(rows, global batch) rows, fp32
    assert f.fetched == (2 * row0 + 2 * row1) * (2 + 4)  # a micro-batch's bf16 rows and their fp32 gradients
    fp32 = rank_footprint(n_layers=1, params_per_unit=3 * 8, branching=[4, 4], units=[2, 1], world_size=4,
                          replicate_levels=1, generic=False, weight_bytes=4, micro_batch=2, global_batch=8)
    assert fp32.masters == 0 and fp32.weights == 2 * f.weights  # an fp32 bank is its own master
    # gather placement sends rows in the bank's dtype and their gradients back in fp32
    assert f.moved_gather - f.moved_owner == pytest.approx((fp32.moved_gather - fp32.moved_owner) * (2 + 4) / (4 + 4),
                                                           abs=2)
    assert f.moved_owner > 0 and f.moved_gather > f.moved_owner  # gather also moves level 1 rows
    # owner placement moves the replicated level only: its touched rows (of 4, 8 sequences a step), fp32
    # gradients reduce-scattered and bf16 rows all-gathered, 3/4 of each sent and as much received
    touched = 4 * (1 - (3 / 4) ** 8)
    assert f.moved_owner == pytest.approx(2 * 3 / 4 * touched * row0 * (4 + 2), abs=1)
    assert fp32.moved_owner == pytest.approx(2 * 3 / 4 * touched * row0 * (4 + 4), abs=1)  # fp32 rows back


def test_anchor_bytes_by_engine():
    assert anchor_bytes_per_rank(1000, 4, "fsdp", 2) == 4000  # 16 bytes a parameter, sharded
    assert anchor_bytes_per_rank(1000, 4, "deepspeed", 1) == 4 * 1000 + 12 * 1000 // 4
    assert anchor_bytes_per_rank(1000, 4, "deepspeed", 3) == 16 * 1000 // 4


def test_paper_160m_fits_on_8_gpus_and_the_table_says_so():
    console = Console(record=True, width=200)
    summary = print_info(load_config("paper-160m"), console, world_size=8)
    per_rank = summary["per_rank"]
    assert summary["anchor"] == 163_510_016 and summary["bank"] == 4_624_220_160
    assert per_rank["total"] < 80 * 2**30  # what issue 7 asks: the per-rank footprint fits an 80 GB GPU
    text = console.export_text()
    assert "memory per rank on 8 rank(s)" in text
    assert f"{per_rank['total'] / 2**30:.2f}" in text
    one = print_info(load_config("paper-160m"), Console(file=open("/dev/null", "w")), world_size=1)["per_rank"]
    assert one["total"] > 4 * per_rank["total"]  # sharding is what makes it fit
    assert per_rank["moved_gather"] > per_rank["moved_owner"]


@pytest.mark.parametrize("preset", ["paper-410m", "paper-1.4b"])
def test_larger_presets_report_per_rank_totals(preset):
    summary = print_info(load_config(preset), Console(file=open("/dev/null", "w")), world_size=64)
    assert 0 < summary["per_rank"]["total"] < 80 * 2**30
