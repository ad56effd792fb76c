import gc

import torch

from mechrecall import devices


def test_release_memory_skips_small_batches_and_trims_large_ones(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(1) or 0)
    devices.release_memory(devices.RELEASE_THRESHOLD)  # a lab model's batch: not worth a trim
    assert calls == []
    devices.release_memory(devices.RELEASE_THRESHOLD + 1)
    devices.release_memory()  # unknown size: always
    assert len(calls) == 2


def test_release_memory_changes_no_tensor():
    x = torch.randn(1000)
    before = x.clone()
    devices.release_memory()
    assert torch.equal(x, before)


def test_nbytes_counts_each_tensor_at_its_dtype():
    assert devices.nbytes([torch.zeros(3, 4), torch.zeros(5, dtype=torch.bfloat16)]) == 3 * 4 * 4 + 5 * 2
