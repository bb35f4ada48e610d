"""Step metrics: the MFU peak table, and the accelerator-memory metrics of a logged step."""
import logging

import pytest
import torch

from hmtrain.memory.exchange import Comm
from hmtrain.train import throughput
from hmtrain.train.throughput import StepResult, Window, peak_for, step_record


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("AMD Instinct MI300X", 1307e12),
])
def test_the_devices_users_have_have_a_peak(name, peak):
    assert peak_for(name) == peak


def test_an_unknown_device_is_named_not_silent(caplog):
    with caplog.at_level(logging.WARNING):
        assert peak_for("Some Future GPU") is None
    assert "unknown device 'Some Future GPU'" in caplog.text


class FakeNow:
    anchor_lr, memory_lr, phase, global_batch = 1e-3, 0.0, "pretrain", 4


def result(device: torch.device) -> StepResult:
    return StepResult(loss_sum=torch.tensor(8.0), global_tokens=4, labels_local=4, grad_norm=torch.tensor(1.0),
                      device=device)


def test_a_cuda_step_logs_peak_memory_and_ooms_and_resets_the_peaks(monkeypatch):
    stats = {"active_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.peak": 5 * 2**30, "num_ooms": 1,
             "num_alloc_retries": 7}
    resets = []
    monkeypatch.setattr(throughput.torch.cuda, "memory_stats", lambda device: stats)
    monkeypatch.setattr(throughput.torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    record = step_record(Comm(torch.device("cpu")), FakeNow, result(torch.device("cuda", 0)), Window(), 1.0, None)
    assert {k: v for k, v in record.items() if k.startswith("gpu/")} == {
        "gpu/max_active_gib": 3.0, "gpu/max_reserved_gib": 5.0, "gpu/num_ooms": 1.0, "gpu/num_alloc_retries": 7.0}
    assert resets == [torch.device("cuda", 0)]  # each window shows its own peak


def test_a_cpu_step_has_no_gpu_metrics():
    record = step_record(Comm(torch.device("cpu")), FakeNow, result(torch.device("cpu")), Window(), 1.0, None)
    assert not any(k.startswith("gpu/") for k in record) and record["loss"] == 2.0
