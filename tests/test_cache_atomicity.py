"""A residual cache folder is all or nothing: an interrupted rewrite leaves the old cache readable and whole."""

import pytest
import torch

import mechrecall.cache as cache_mod
from mechrecall.cache import ResidualCache, cache_residuals
from mechrecall.lab.config import get_preset
from mechrecall.lab.models import build_model


@pytest.fixture(scope="module")
def model_and_facts(micro_dataset, micro_tokenizer):
    model = build_model(get_preset("micro").model, micro_tokenizer, seed=1)
    pids = micro_dataset.pids("heldout")[:8]
    return model, micro_dataset.storage_examples(pids), micro_dataset.query_examples(pids)


def test_an_interrupted_rewrite_keeps_the_old_cache(tmp_path, monkeypatch, model_and_facts, micro_tokenizer):
    model, storage, query = model_and_facts
    folder = tmp_path / "cache"
    cache_residuals(model, micro_tokenizer, storage, folder, batch_size=4, shard_size=8)
    old = ResidualCache.load(folder)
    real_save, saved = cache_mod.save_file, []

    def killed_after_two_shards(block, path, *a, **k):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) in the middle of the rewrite
        saved.append(path)
        return real_save(block, path, *a, **k)

    monkeypatch.setattr(cache_mod, "save_file", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        cache_residuals(model, micro_tokenizer, query, folder, batch_size=4, shard_size=8)
    again = ResidualCache.load(folder)
    assert again.meta["format"] == old.meta["format"] == ["storage"]
    assert all(torch.equal(again.data[s], old.data[s]) for s in old.data)  # the old states, not the new shards
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # the interrupted temporary is gone
    monkeypatch.setattr(cache_mod, "save_file", real_save)
    cache_residuals(model, micro_tokenizer, query, folder, batch_size=4, shard_size=8)  # a full rewrite replaces it
    assert ResidualCache.load(folder).meta["format"] == ["query"]


def test_a_temporary_left_by_a_killed_run_is_removed_by_the_next(tmp_path, model_and_facts, micro_tokenizer):
    model, storage, _ = model_and_facts
    stale = tmp_path / ".cache.x1y2.tmp"
    stale.mkdir()
    (stale / "shard-00000.safetensors").write_bytes(b"half")
    cache_residuals(model, micro_tokenizer, storage, tmp_path / "cache", batch_size=4, shard_size=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_folder_with_other_files_is_never_replaced_by_a_cache(tmp_path, model_and_facts, micro_tokenizer):
    model, storage, _ = model_and_facts
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt' and is not a residual cache"):
        cache_residuals(model, micro_tokenizer, storage, tmp_path, batch_size=4)
    assert (tmp_path / "notes.txt").read_text() == "mine"
