"""Files a user is handed (a colleague's run folder, a downloaded archive) never run code when read."""

import torch

from mechrecall.lab.config import get_preset
from mechrecall.lab.train import main as train_main
from mechrecall.lab.train import train

SHORT = ["mixed.steps=12", "mixed.eval_every=6", "save_every=6"]


class _Payload:
    """Unpickling this calls ``open(target, "w")``: the file appearing is the proof that code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_crafted_trainer_state_runs_nothing_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(get_preset("micro", SHORT), "mixed", run, progress=False, stop_after=6) == {"interrupted_at": 6}
    state_file = run / "mixed" / "checkpoints" / "step-000006" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    marker = tmp_path / "owned"
    state["history"].append(_Payload(marker))  # the payload rides inside an otherwise valid state
    torch.save(state, state_file)
    overrides = [arg for s in SHORT for arg in ("--set", s)]
    code = train_main(["--preset", "micro", "--regime", "mixed", "--out", str(run), "--quiet", *overrides])
    assert code == 2
    assert not marker.exists(), "unpickling the trainer state ran the payload"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(state_file) in err[0] and "refused" in err[0], err
