"""A run folder belongs to one run: mixing configs, concurrent writers, corrupt or half-written checkpoints."""

import pytest
import torch
from filelock import FileLock
from safetensors.torch import load_file

from mechrecall.lab.config import get_preset
from mechrecall.lab.train import main, train

SHORT = ["mixed.steps=12", "mixed.eval_every=6", "save_every=4"]


def _cli(out, *overrides, extra=()):
    args = ["--preset", "micro", "--regime", "mixed", "--out", str(out), "--quiet", *extra]
    return main(args + [a for o in (*SHORT, *overrides) for a in ("--set", o)])


def _one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1, err
    return err[0]


def _checkpoints(out):
    return sorted(p.name for p in (out / "mixed" / "checkpoints").glob("step-*"))


def test_another_config_into_the_same_folder_is_refused_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, extra=["--stop-after", "4"]) == 0  # a run stopped midway
    before = _checkpoints(out)
    assert _cli(out, "mixed.lr=0.01", "seed=3") == 2  # resumed with other settings: refused, nothing written
    line = _one_error_line(capsys)
    assert "holds another run" in line and "config.mixed.lr: 0.003 -> 0.01" in line and "config.seed: 0 -> 3" in line
    assert _checkpoints(out) == before and not (out / "mixed" / "final").exists()
    assert _cli(out, "threads=1") == 0  # an execution knob is not another run
    capsys.readouterr()
    assert _cli(out) == 0  # asked again when finished: says so, trains nothing
    assert "already finished this config" in capsys.readouterr().out
    assert _cli(out, "mixed.lr=0.01", extra=["--no-resume"]) == 0  # an explicit restart replaces the run whole
    assert "mixed.lr: 0.003 -> 0.01" not in capsys.readouterr().err


def test_a_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "mixed").mkdir(parents=True)
    with FileLock(str(out / "mixed" / ".writer.lock")):  # another process holds the folder
        assert _cli(out) == 2
    assert "being trained by another process" in _one_error_line(capsys)
    assert not (out / "mixed" / "checkpoints").exists()


@pytest.mark.parametrize("broken", ["model.safetensors", "trainer_state.pt"])
def test_a_truncated_newest_checkpoint_is_named_and_the_one_before_used(tmp_path, capsys, broken):
    preset = get_preset("micro", SHORT)
    train(preset, "mixed", tmp_path / "full", progress=False)
    out = tmp_path / "cut"
    train(preset, "mixed", out, progress=False, stop_after=9)  # checkpoints at steps 4 and 8, and 9 (interrupted)
    newest = out / "mixed" / "checkpoints" / "step-000009"
    data = (newest / broken).read_bytes()
    (newest / broken).write_bytes(data[: len(data) // 3])  # a full disk or a killed copy
    stale = out / "mixed" / "checkpoints" / ".step-000012.abc.tmp"
    stale.mkdir()  # the temporary of a checkpoint write that was killed
    train(preset, "mixed", out, progress=False)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "checkpoint before it" in warnings[0]
    a, b = (load_file(r / "mixed" / "final" / "model.safetensors") for r in (tmp_path / "full", out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 8: the same weights as without a break
    assert not stale.exists()


def test_a_stage_with_no_data_is_refused_before_any_work(tmp_path, capsys):
    assert _cli(tmp_path / "run", "mixed.batch_storage=0", "mixed.batch_query=0") == 2
    assert "mixed: batch_storage and batch_query are both 0" in _one_error_line(capsys)
    assert not (tmp_path / "run" / "data").exists()


def test_fp16_autocast_on_the_cpu_warns_with_the_reason(tmp_path):
    with pytest.warns(UserWarning, match="fp16 on the CPU is emulated"):
        train(get_preset("micro", ["mixed.steps=1"]), "mixed", tmp_path / "run", progress=False, autocast="fp16")


def test_a_folder_from_before_run_records_is_checked_against_its_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(out, extra=["--stop-after", "4"]) == 0
    (out / "mixed" / "run.json").unlink()  # as written by an older version
    assert _cli(out, "mixed.lr=0.01") == 2
    assert "config.mixed.lr: 0.003 -> 0.01" in _one_error_line(capsys)
    assert not (out / "mixed" / "run.json").exists()  # a refused resume records nothing


def test_a_bad_restart_deletes_nothing(tmp_path, capsys):
    """--no-resume with a seed whose dataset is not the folder's: refused by the data check before anything goes."""
    out = tmp_path / "run"
    assert _cli(out) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert _cli(out, "seed=3", extra=["--no-resume"]) == 2
    assert "holds dataset" in _one_error_line(capsys)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_checkpoint_caught_between_its_two_renames_is_restored(tmp_path):
    preset = get_preset("micro", SHORT)
    out = tmp_path / "run"
    train(preset, "mixed", out, progress=False, stop_after=9)
    ckpts = out / "mixed" / "checkpoints"
    (ckpts / "step-000009").rename(ckpts / ".step-000009.old")  # killed after moving the old copy aside
    train(preset, "mixed", out, progress=False, stop_after=10)
    assert (ckpts / "step-000009").is_dir() and not (ckpts / ".step-000009.old").exists()


def test_blind_runs_print_no_held_out_number(tmp_path, capsys):
    assert _cli(tmp_path / "run", extra=["--blind"]) == 0
    out = capsys.readouterr().out
    assert "validation_qa=" in out and "heldout" not in out
