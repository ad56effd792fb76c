"""Choosing a step (a budget) or a run (a learning rate) from training histories, on the validation people only.

A run's ``history.json`` logs every split at every evaluation, held-out QA included, so that trajectories can be
plotted after the fact. Choosing from it must not look at the held-out people. :func:`validation_view` keeps only
the columns a choice may read (step, trained QA, validation QA and its answer NLL, storage, losses), and
:func:`choose` applies the rule the presets' budgets were chosen by:

    among the evaluated steps with trained QA >= ``min_trained`` (the trained half learnt), the highest validation QA;
    ties go to the lower validation answer NLL (``validation_qa_nll``, a continuous measure: exact match on a few
    dozen validation questions ties often), then to the earlier step. When no step qualifies, the last one.

Steps are ordered by ``global_step`` (a two-stage or pre-instruction history restarts ``step`` at each stage); a
history with validation QA in several stages needs ``stage=`` to say which.

CLI: ``python analyses/choose_budget.py RUN/mixed/history.json [...] [--at-step N] [--min-trained 0.95]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["VISIBLE", "read_history", "validation_view", "Choice", "choose"]

# the only columns a choice reads or prints (every held-out key is left out by construction)
VISIBLE = ("stage", "step", "global_step", "lr", "trained_qa", "validation_qa", "validation_qa_nll", "storage")


def read_history(path: str | Path) -> list[dict]:
    """A run's ``history.json`` (a list of evaluation records); one clear error naming the file otherwise."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such history file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "step" in r for r in records):
        raise ValueError(f"{path}: not a training history (a list of records with a 'step')")
    return records


def validation_view(records: Sequence[dict], stage: str | None = None) -> pd.DataFrame:
    """The evaluations of ``records`` (one ``stage`` of them, if given) with only the :data:`VISIBLE` columns and the
    training losses; rows without validation QA (storage-only evaluations) are dropped."""
    rows = []
    for r in records:
        if stage is not None and r.get("stage") != stage:
            continue
        v = r.get("validation_qa")
        if v is None or v != v:  # storage-only evaluations; an empty validation split (NaN)
            continue
        rows.append({k: r[k] for k in r if k in VISIBLE or k.startswith("loss_")})
    return pd.DataFrame(rows)


@dataclass
class Choice:
    """The chosen evaluation: its run (index into the histories given), stage, step, and why."""

    run: int
    stage: str | None
    step: int
    global_step: int
    trained_qa: float
    validation_qa: float
    validation_qa_nll: float | None  # None: the history predates the NLL (or it was NaN)
    qualified: bool  # False: no step reached min_trained, so the last step was taken


def choose(
    histories: Sequence[Sequence[dict]],
    *,
    min_trained: float = 0.95,
    at_step: int | None = None,
    stage: str | None = None,
) -> Choice:
    """The rule of this module's docstring over every evaluation of every history (``at_step``: that step only, e.g.
    to compare learning-rate probes at equal steps). Reads validation and trained columns only."""
    views = [validation_view(h, stage) for h in histories]
    stages = sorted({str(x) for v in views if "stage" in v for x in v["stage"].unique()})
    if stage is None and len(stages) > 1:
        raise ValueError(f"the histories hold validation QA of several stages ({', '.join(stages)}): choose one")
    cands = []
    for i, v in enumerate(views):
        for r in v.to_dict("records"):
            r.setdefault("global_step", r["step"])
            if at_step is None or r["step"] == at_step:
                cands.append((i, r))
    if not cands:
        raise ValueError(f"no evaluation with validation QA{'' if at_step is None else f' at step {at_step}'}")
    ok = [(i, r) for i, r in cands if r.get("trained_qa", 0.0) >= min_trained]

    def nll(r: dict) -> float | None:
        x = r.get("validation_qa_nll")
        return None if x is None or x != x else float(x)

    def key(c) -> tuple:  # best validation QA, then lowest NLL (a missing one last), then earliest
        nl = nll(c[1])
        return (-c[1]["validation_qa"], math.inf if nl is None else nl, c[1]["global_step"], c[0])

    if ok:
        i, r = min(ok, key=key)
    else:  # the budget cap: the last evaluation (of the first history holding it)
        i, r = max(cands, key=lambda c: (c[1]["global_step"], -c[0]))
    return Choice(
        i, r.get("stage"), int(r["step"]), int(r["global_step"]), r.get("trained_qa", math.nan), r["validation_qa"],
        nll(r), bool(ok),
    )  # fmt: skip
