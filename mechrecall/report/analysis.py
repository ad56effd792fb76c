"""The registry of analyses: what ``reproduce``, the report page, ``results.md`` and ``python -m mechrecall analyze``
loop over.

An analysis is one module of :mod:`mechrecall.report` that defines ``ANALYSIS = Analysis(...)``: its name, the JSON
file it writes, how to run it on a checkpoint pair, its figures with captions and its summary rows. Adding one is that
module and its test; nothing else names it. A pair is ``(first, second)``: the reference model first (two-stage in
the lab) and the model under study second (mixed); results key them by label (``labels``, default the lab's regime
names), so captions and tables say which is which for any pair.

Analyses written by scripts beside a run (``analyses/grafting.py``, ``predict_generalization.py``, ``remedy.py``)
register with ``beside=True`` and no pair runner: the page shows them when their JSON is in the run folder.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "PAPER",
    "Analysis",
    "PairContext",
    "analyses",
    "get_analysis",
    "check_labels",
    "pair_labels",
    "labels_of",
    "load_json",
    "versus",
]

PAPER = "Zhang et al. 2025 (arXiv 2505.16178)"

LAB_LABELS = ("two_stage", "mixed")


@dataclass(frozen=True)
class PairContext:
    """What a pair runner may need beyond the two checkpoints: the preset they were trained with (None for any two
    checkpoints), the run's starting checkpoint ``base`` and whether the base was pretrained (smaller sizes)."""

    preset: object | None = None
    base: str | None = None
    pretrained: bool = False


@dataclass(frozen=True)
class Analysis:
    """One analysis of a checkpoint pair.

    ``run_pair(first, second, out, *, registry, labels, context)`` writes ``out/<output>`` (and its figures) and
    returns the result; ``captioned(result)`` gives ``(figure, caption)`` pairs for the page; ``summary(result)``
    gives markdown lines for ``results.md`` under ``title(result)``. ``pretrained_sizes`` are the runner's keyword
    sizes on a pretrained base (a 100M+ model on a CPU), recorded in the analysis' own JSON.
    """

    name: str
    output: str
    order: int
    captioned: Callable[[dict], list[tuple]]
    run_pair: Callable[..., dict] | None = None
    summary: Callable[[dict], list[str]] | None = None
    title: Callable[[dict], str] | None = None
    pretrained_sizes: Mapping = field(default_factory=dict)
    beside: bool = False

    def sizes(self, context: PairContext) -> dict:
        return dict(self.pretrained_sizes) if context.pretrained else {}

    def load(self, run: str | Path) -> dict | None:
        """This analysis' result in a run folder (``run/<output>``, or ``run/<name>/<output>`` for one written
        beside the run), or None."""
        run = Path(run)
        found = load_json(run / self.output)
        return found if found is not None or not self.beside else load_json(run / self.name / self.output)


def analyses() -> list[Analysis]:
    """Every registered analysis, in page order (the modules of :mod:`mechrecall.report` that define ``ANALYSIS``)."""
    import mechrecall.report as pkg

    found = []
    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        if isinstance(getattr(module, "ANALYSIS", None), Analysis):
            found.append(module.ANALYSIS)
    return sorted(found, key=lambda a: a.order)


def get_analysis(name: str) -> Analysis:
    known = {a.name: a for a in analyses()}
    if name not in known:
        raise ValueError(f"unknown analysis {name!r}; registered: {', '.join(known)}")
    return known[name]


def check_labels(labels: Sequence[str] | None, n: int) -> list[str] | None:
    """``labels`` if there is one per checkpoint and no two are equal (else a ``ValueError`` saying so)."""
    if labels is None:
        return None
    if len(labels) != n or len(set(labels)) != len(labels):
        raise ValueError(f"--labels {' '.join(labels)}: give {n} different names, one per checkpoint")
    return list(labels)


def pair_labels(first: str, second: str, facts, labels) -> list[tuple[str, str]]:
    """(label, source) per checkpoint of a pair: the lab's regime names for a lab pair, else the given labels or the
    sources themselves (made unique: one checkpoint twice is ``name`` and ``name#2``)."""
    from mechrecall.loading import unique_labels

    if facts is None and labels is None:
        return list(zip(LAB_LABELS, (first, second)))
    return list(zip(check_labels(labels, 2) or unique_labels([first, second]), (first, second)))


def labels_of(result: Mapping) -> list[str]:
    """The models of a result, reference first: its ``labels``, else the lab's two regimes."""
    return list(result.get("labels", LAB_LABELS))


def load_json(path: Path, expect: type = dict):
    """A run's JSON file (None when absent); one error naming the file when it is not a JSON ``expect``."""
    import json

    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, expect):
        raise ValueError(f"{path}: expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data


# said under any graft between models trained from scratch: they share no coordinates for a mask to carry
NOT_A_SHARED_BASE_TEST = ("These models were trained from scratch and share no coordinates, so this is not a test of "
                          "the paper's claim, which is about two models fine-tuned from one pretrained base.")  # fmt: skip


def from_scratch(meta: Mapping) -> bool:
    """Whether a checkpoint's metadata says it is a lab model trained from a random initialisation (its preset had no
    ``model.source``); False for a pretrained base, a model fine-tuned from one, or a checkpoint without lab metadata."""
    return (meta.get("config") or {}).get("model", {}).get("source", "") is None


def versus(
    value: float,
    reference: float,
    claim: str,
    margin: float = 0.0,
    *,
    intervals: tuple[Sequence[float], Sequence[float]] | None = None,
    margin_is: str = "twice the spread of the random controls",
) -> str:
    """The paper's claim (``value`` above ``reference``), and what this run says about it, no more than it measured.

    With ``intervals`` (the two values' 95 % intervals) the run agrees only when they do not overlap; with a
    ``margin`` (what it is: ``margin_is``) the difference must exceed it; with neither, the caption says only which
    way the difference points, and that no interval was compared."""
    if intervals is not None:
        (v_lo, v_hi), (r_lo, r_hi) = intervals
        if v_lo > r_hi:
            verdict = "agrees (95% intervals do not overlap)"
        elif r_lo > v_hi:
            verdict = "does not agree (95% intervals do not overlap)"
        else:
            verdict = "shows no clear difference (95% intervals overlap)"
    elif margin > 0:
        if value - reference > margin:
            verdict = f"agrees (the difference exceeds {margin_is})"
        elif reference - value > margin:
            verdict = f"does not agree (the difference exceeds {margin_is})"
        else:
            verdict = f"shows no clear difference (within {margin_is})"
    elif value == reference:
        return f"The paper: {claim}. This run shows no difference."
    else:
        way = "the paper's way" if value > reference else "against the paper"
        return f"The paper: {claim}. This run's difference points {way} (no interval compared)."
    return f"The paper: {claim}. This run {verdict}."
