"""What every patching backend shares: the inputs of a sweep (:class:`PatchInputs`), the metrics read at the
answer position (a registry: :func:`register_metric`, :func:`get_metric`), noise corruption and the result type.

Kept apart from :mod:`mechrecall.patching.core` (the Hugging Face engine) and :mod:`mechrecall.patching.backends`
(TransformerLens, nnsight), which both build on it; ``core`` re-exports every name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechrecall import arch

__all__ = [
    "Metric",
    "METRICS",
    "WHOLE_ANSWER_METRICS",
    "register_metric",
    "is_whole_answer",
    "get_metric",
    "PatchInputs",
    "n_read",
    "read_positions",
    "metric_on",
    "GaussianNoise",
    "PatchResult",
]

Metric = Callable[[Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------------ metrics
def _logprob(logits, answer, foil):
    return logits.log_softmax(-1).gather(1, answer[:, None])[:, 0]


def _prob(logits, answer, foil):
    return logits.softmax(-1).gather(1, answer[:, None])[:, 0]


def _logit_diff(logits, answer, foil):
    return logits.gather(1, answer[:, None])[:, 0] - logits.gather(1, foil[:, None])[:, 0]


def _rank(logits, answer, foil):
    return (logits > logits.gather(1, answer[:, None])).sum(1).float()


def _hit(logits, answer, foil):
    return (logits.argmax(-1) == answer).float()


# Whole-answer metrics read the logits at every answer-predicting position (the answer teacher-forced after the
# prompt): ``fn(logits [rows, n_answer, vocab], answer_ids [rows, n_answer], foil_ids) -> [rows]``, where
# ``answer_ids`` is right-padded with -1. A multi-token answer ("Princeton, NJ") is then scored as a whole, not
# by its first token only.
def _answer_logprob(logits, answer_ids, foil_ids):
    lp = logits.log_softmax(-1).gather(2, answer_ids.clamp(min=0)[..., None])[..., 0]
    return torch.where(answer_ids >= 0, lp, torch.zeros_like(lp)).sum(1)  # padding adds 0 (even against -inf)


def _answer_match(logits, answer_ids, foil_ids):
    return ((logits.argmax(-1) == answer_ids) | (answer_ids < 0)).all(1).float()


_answer_logprob.whole_answer = _answer_match.whole_answer = True

METRICS: dict[str, Metric] = {
    "logprob": _logprob,
    "prob": _prob,
    "logit_diff": _logit_diff,
    "rank": _rank,
    "hit": _hit,
    "answer_logprob": _answer_logprob,
    "answer_match": _answer_match,
}
WHOLE_ANSWER_METRICS = ("answer_logprob", "answer_match")


def register_metric(name: str, fn: Metric, *, whole_answer: bool = False) -> None:
    """Add a metric under ``name``: ``fn(logits [rows, vocab], answer [rows], foil [rows]) -> [rows]`` read at the
    readout, or with ``whole_answer=True`` ``fn(logits [rows, n_answer, vocab], answer_ids, foil_ids) -> [rows]``
    read at every answer-predicting position (ids right-padded with -1)."""
    if whole_answer:
        fn.whole_answer = True
    METRICS[name] = fn


def is_whole_answer(fn: Metric) -> bool:
    """Whether ``fn`` reads the whole (teacher-forced) answer rather than the readout's next token."""
    return bool(getattr(fn, "whole_answer", False))


def get_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; registered: {sorted(METRICS)}")
    return METRICS[metric]


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class PatchInputs:
    """One side of a patching experiment: right-padded prompts and, per row, the positions that matter.

    ``positions[b, j]`` is row ``b``'s token position for the ``j``-th named position (``pos_labels[j]``, e.g. a
    role); ``readout[b]`` the position whose next-token logits the metric reads (the last prompt token);
    ``answer``/``foil`` the token ids the metric compares. For whole-answer metrics, ``answer_ids`` /
    ``foil_ids`` hold every answer token (right-padded with -1) and ``input_ids`` carries ``answer_ids``
    teacher-forced after the readout, so answer token ``k`` is predicted at position ``readout + k``. Build them from
    facts with :func:`mechrecall.patching.prompts.fact_inputs` (``whole_answer=True``).
    """

    input_ids: Int[Tensor, "batch pos"]
    positions: Int[Tensor, "batch n_pos"]
    readout: Int[Tensor, " batch"]
    answer: Int[Tensor, " batch"]
    foil: Int[Tensor, " batch"]
    pos_labels: list[str]
    subject_positions: list[list[int]] = field(default_factory=list)  # every subject token (for corruption)
    answer_ids: Int[Tensor, "batch n_answer"] | None = None
    foil_ids: Int[Tensor, "batch n_answer_foil"] | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def all_positions(self) -> PatchInputs:
        """The same prompts with every prompt position as a named position (for equal-length prompts)."""
        T = int(self.readout.max()) + 1
        return replace(
            self, positions=torch.arange(T).expand(len(self), -1).clone(), pos_labels=[str(i) for i in range(T)]
        )

    def span(self, k: int) -> Int[Tensor, "batch k"]:
        """The ``k`` positions read per row: ``readout .. readout + k - 1`` (the answer-predicting positions)."""
        return (self.readout[:, None] + torch.arange(k, device=self.readout.device)).clamp(
            max=self.input_ids.shape[1] - 1
        )

    def widened(self, k: int) -> PatchInputs:
        """The same inputs, right-padded so that every row has ``k`` positions from its readout on (rows with a short
        answer after a long prompt would otherwise read past the end; the padding is never scored)."""
        need = int(self.readout.max()) + k
        if self.input_ids.shape[1] >= need:
            return self
        pad = self.input_ids.new_zeros(len(self), need - self.input_ids.shape[1])
        return replace(self, input_ids=torch.cat([self.input_ids, pad], 1))


def n_read(fns: Sequence[Metric], inputs: PatchInputs) -> int:
    """Positions read per row: the whole answer's when a metric needs it, else the readout alone."""
    if not any(is_whole_answer(f) for f in fns):
        return 1
    if inputs.answer_ids is None:
        raise ValueError("a whole-answer metric needs inputs built with whole_answer=True (fact_inputs / fact_pairs)")
    return inputs.answer_ids.shape[1]


def read_positions(logits: Tensor, rows: Tensor, span: Tensor) -> Tensor:
    """``logits [n, pos, vocab]`` at each row's ``span [n, k]`` positions: ``[n, k, vocab]``."""
    if span.shape[1] == 1:
        return logits[rows, span[:, 0]][:, None]
    return logits[rows[:, None], span]


def metric_on(fn: Metric, logits: Tensor, inputs: PatchInputs, idx: Tensor | None = None) -> Tensor:
    """``fn`` on ``logits [rows, k, vocab]`` (or ``[rows, vocab]``) read for ``inputs``' rows ``idx`` (default: all)."""
    if logits.dim() == 2:
        logits = logits[:, None]
    dev = logits.device

    def rows(t: Tensor) -> Tensor:
        return (t if idx is None else t[idx.to(t.device)]).to(dev)

    if is_whole_answer(fn):
        if inputs.answer_ids is None:
            raise ValueError("a whole-answer metric needs inputs built with whole_answer=True")
        a = rows(inputs.answer_ids)
        return fn(
            logits[:, : a.shape[1]], a, rows(inputs.foil_ids if inputs.foil_ids is not None else inputs.answer_ids)
        )
    return fn(logits[:, 0], rows(inputs.answer), rows(inputs.foil))


@dataclass
class GaussianNoise:
    """ROME's corruption: add N(0, (scale * std of the embedding matrix)^2) to the subject tokens' embeddings."""

    scale: float = 3.0
    seed: int = 0

    def noise(self, model, inputs: PatchInputs) -> Float[Tensor, "batch pos d_model"]:
        """The noise added to the embedding module's output (drawn on the CPU, so it is the same on every device;
        scaled like the embedding's output, which Gemma multiplies by sqrt(d_model))."""
        emb = model.get_input_embeddings().weight
        std = float(emb.detach().float().std()) * arch.embed_scale(model)
        g = torch.Generator().manual_seed(self.seed)
        # drawn over the prompts only, so teacher-forced answers appended to them do not change the noise
        B, T = inputs.input_ids.shape
        P = min(T, int(inputs.readout.max()) + 1)
        noise = torch.zeros(B, T, emb.shape[1])
        noise[:, :P] = torch.randn(B, P, emb.shape[1], generator=g) * self.scale * std
        keep = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
        for b, ps in enumerate(inputs.subject_positions):
            keep[b, ps] = True
        return noise * keep[..., None]


# ------------------------------------------------------------------------------------------------ results
@dataclass
class PatchResult:
    """Per-example metric values of a sweep: ``values[layer, (head,) pos, batch]``; ``base``/``source`` unpatched."""

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list]
    base: Float[Tensor, " batch"]
    source: Float[Tensor, " batch"] | None
    site: str
    metric: str

    def mean(self) -> Tensor:
        return self.values.mean(-1)

    def effect(self) -> Tensor:
        """Patched minus unpatched base value, per example."""
        return self.values - self.base

    def normalized(self) -> Tensor:
        """(patched - base) / (source - base), per example: 0 = no effect, 1 = the source's own value."""
        if self.source is None:
            raise ValueError("no source value recorded (source prompts differ in format: give source_readout)")
        return (self.values - self.base) / (self.source - self.base)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (patch, example): axis labels, example index, value, base value, effect."""
        idx = torch.cartesian_prod(*[torch.arange(n) for n in self.values.shape]).reshape(-1, self.values.ndim)
        df = pd.DataFrame({a: [self.labels[a][i] for i in idx[:, k].tolist()] for k, a in enumerate(self.axes)})
        df["value"] = self.values.reshape(-1).tolist()
        df["base"] = self.base[idx[:, -1]].tolist()
        df["effect"] = df["value"] - df["base"]
        df["site"], df["metric"] = self.site, self.metric
        return df


# ------------------------------------------------------------------------------------------------ setters
