"""Multi-process training under ``accelerate launch`` (2 processes, gloo, on this CPU): the same global batch gives
the weights and the trace of a one-process run within float tolerance; an interrupted launch resumes exactly; a resume
with another number of processes is refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechrecall.lab.config import get_preset
from mechrecall.lab.trace import GradientTrace
from mechrecall.lab.train import train

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["data.n_people=40", "mixed.steps=8", "mixed.eval_every=4", "save_every=4", "mixed.warmup=2"]


def _launch(out: Path, *extra: str, n: int = 2, fsdp: bool = False) -> subprocess.CompletedProcess:
    # accelerate's --cpu launches one process (its multi-CPU mode needs MPI); --multi_gpu is its torch.distributed
    # launcher, which on a CPU machine gives gloo processes (the trainer asks accelerate for the CPU); --use_fsdp the
    # same processes with ACCELERATE_USE_FSDP set (here from the documented FSDP config file, with 2 processes), which
    # the trainer shards with FSDP2 itself
    mode = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp-3b.yaml")] if fsdp else ["--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n), "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mechrecall", "train", "--preset", "micro",
           "--regime", "mixed", "--out", str(out), "--quiet", *[f"--set={o}" for o in SHORT], *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


def _final(run: Path) -> dict:
    return load_file(run / "mixed" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = _launch(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "mixed" / "final" / "mechrecall.json").read_text())["processes"] == 2
    return out


def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run, tmp_path):
    train(get_preset("micro", SHORT), "mixed", tmp_path / "one", progress=False)
    a, b = _final(tmp_path / "one"), _final(two_process_run)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    ta, tb = (
        GradientTrace.load(tmp_path / "one" / "mixed" / "final"),
        GradientTrace.load(two_process_run / "mixed" / "final"),
    )
    assert ta.steps == tb.steps
    for fmt in ("storage", "query"):  # the trace is the global batch's, reduced across processes
        for name, t in ta.mean_abs_grad(fmt).items():
            assert torch.allclose(t, tb.mean_abs_grad(fmt)[name], rtol=1e-3, atol=1e-6), (fmt, name)


def test_an_interrupted_launch_resumes_exactly_and_refuses_another_world_size(two_process_run, tmp_path, capsys):
    out = tmp_path / "cut"
    r = _launch(out, "--stop-after", "5")
    assert r.returncode == 0 and "interrupted after global step 5" in r.stdout, r.stderr[-3000:]
    assert not (out / "mixed" / "final").exists()
    from mechrecall.lab.train import main  # a one-process resume of a two-process checkpoint

    assert main(["--preset", "micro", "--regime", "mixed", "--out", str(out), *[f"--set={o}" for o in SHORT]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "written by a run of 2 process(es) and this launch has 1" in err[0]
    r = _launch(out)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final(two_process_run), _final(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    r = _launch(out, fsdp=True)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "mixed" / "final" / "mechrecall.json").read_text())
    assert (meta["processes"], meta["parallel"]) == (2, "fsdp")
    return out


def test_fsdp_equals_one_process_and_ddp(fsdp_run, two_process_run, tmp_path):
    """FSDP2 over 2 processes (every parameter, gradient and moment sharded) trains the weights and the trace of the
    same global batch on one process; its checkpoint is a plain HF folder with the usual (tied) names."""
    train(get_preset("micro", SHORT), "mixed", tmp_path / "one", progress=False)
    a, f, d = _final(tmp_path / "one"), _final(fsdp_run), _final(two_process_run)
    assert a.keys() == f.keys()
    assert max(float((a[k] - f[k]).abs().max()) for k in a) < 1e-4
    assert max(float((d[k] - f[k]).abs().max()) for k in a) < 1e-4
    ta, tf = (GradientTrace.load(r / "mixed" / "final") for r in (tmp_path / "one", fsdp_run))
    assert ta.steps == tf.steps
    for fmt in ("storage", "query"):
        for name, t in ta.mean_abs_grad(fmt).items():
            assert torch.allclose(t, tf.mean_abs_grad(fmt)[name], rtol=1e-3, atol=1e-6), (fmt, name)
    from mechrecall.lab.models import load_checkpoint

    model, _, _ = load_checkpoint(fsdp_run / "mixed" / "final")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_an_interrupted_fsdp_launch_resumes_exactly_and_refuses_a_ddp_resume(fsdp_run, tmp_path):
    out = tmp_path / "cut"
    r = _launch(out, "--stop-after", "5", fsdp=True)
    assert r.returncode == 0 and "interrupted after global step 5" in r.stdout, r.stderr[-3000:]
    r = _launch(out)  # the same two processes without sharding: refused, nothing written
    assert r.returncode != 0 and "written by a fsdp launch and this one is ddp" in r.stderr, r.stderr[-3000:]
    assert not (out / "mixed" / "final").exists()
    r = _launch(out, fsdp=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final(fsdp_run), _final(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
