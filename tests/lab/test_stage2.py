import pytest

from mechrecall.lab.stage2 import choose


def test_choose_picks_most_storage_at_first_target_crossing():
    curves = {
        "fast": [{"step": 10, "trained_qa": 0.5, "storage": 0.9}, {"step": 20, "trained_qa": 0.96, "storage": 0.4}],
        "slow": [
            {"step": 10, "trained_qa": 0.3, "storage": 0.99},
            {"step": 40, "trained_qa": 0.95, "storage": 0.8},
            {"step": 60, "trained_qa": 1.0, "storage": 0.1},
        ],
        "never": [{"step": 10, "trained_qa": 0.2, "storage": 1.0}],
    }
    out = choose(curves, 0.95)
    assert out["chosen"] == "slow"
    assert out["reached"]["slow"]["step"] == 40 and "never" not in out["reached"]


def test_choose_with_no_recipe_reaching_target():
    assert choose({"a": [{"step": 1, "trained_qa": 0.1, "storage": 1.0}]}, 0.95)["chosen"] is None


def test_sweep_runs_recipes_from_the_stage1_checkpoint(tmp_path):
    from mechrecall.lab.config import get_preset
    from mechrecall.lab.stage2 import sweep
    from mechrecall.lab.train import train

    preset = get_preset("micro", ["two_stage.stage1.steps=30", "two_stage.stage2.steps=10", "mixed.steps=10"])
    train(preset, "two_stage", tmp_path / "run", progress=False)
    result = sweep(preset, tmp_path / "run", tmp_path / "sweep", ["full-lr1e-3", "lora-qv-r8"], steps=20, eval_every=10)
    assert set(result["curves"]) == {"full-lr1e-3", "lora-qv-r8"}
    for curve in result["curves"].values():
        assert [h["step"] for h in curve] == [10, 20]
        assert all(0 <= h["storage"] <= 1 for h in curve)
    assert (tmp_path / "sweep" / "stage2_sweep.json").exists()
    with pytest.raises(KeyError, match="unknown stage-2 recipe"):
        sweep(preset, tmp_path / "run", tmp_path / "sweep", ["nope"])
