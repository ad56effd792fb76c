import gc

import pytest
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


@pytest.mark.parametrize("speed, warns", [(0.02, True), (2.6, False)])
def test_bf16_on_a_cpu_that_emulates_it_warns_once(monkeypatch, speed, warns):
    import warnings

    import mechrecall.devices as devices

    monkeypatch.setattr(devices, "cpu_bf16_speed", lambda: speed)
    devices._warn_if_bf16_emulated.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert devices.resolve_dtype("bf16", "cpu") is torch.bfloat16
            devices.resolve_dtype("bf16", "cpu")
            devices.resolve_dtype("float32", "cpu")
        messages = [str(w.message) for w in caught if "bf16 on this CPU" in str(w.message)]
        assert len(messages) == (1 if warns else 0)
        if warns:
            assert "0.02x the float32 rate" in messages[0]
    finally:
        devices._warn_if_bf16_emulated.cache_clear()


def test_the_bf16_speed_probe_leaves_the_thread_count_as_it_was():
    before = torch.get_num_threads()
    assert devices.cpu_bf16_speed.__wrapped__() > 0  # uncached: a real measurement
    assert torch.get_num_threads() == before
