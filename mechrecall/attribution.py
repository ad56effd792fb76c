"""Token-role attribution: which input tokens a model uses to produce a fact's value, grouped by role.

For a storage-format prompt (the biography up to a fact's value, earlier sentences included) the target is the
log-probability of the value's first token at the last prompt token. Three attributions per token:

- :func:`integrated_gradients` on the input embeddings (Gauss-Legendre quadrature as Captum's default), with a
  completeness check: the attributions of a prompt sum to f(input) - f(baseline) up to the returned ``delta``; each
  prompt's steps double until its own ``|delta|`` is small (a converged prompt keeps its first satisfying count).
  Baseline: the mean token embedding at every attributed position (position 0, ``<bos>`` or the first text token,
  stays as it is: :func:`role_inputs`). Not zero: the first norm (RMSNorm, or LayerNorm) maps every positive multiple of a vector to the
  same point, so on a path from zero the whole change happens near zero and quadrature does not converge;
- :func:`gradient_x_input` (one backward; input minus the same baseline);
- :func:`occlusion_by_role`: set a whole role's embeddings to the baseline and measure the drop of the target.

Roles partition the prompt (position 0 and padding excluded): ``subject`` (this sentence's subject mention),
``relation`` (the relation words before the last prompt token), ``answer_preceding`` (the last prompt token, which
predicts the value), ``subject_elsewhere`` (the subject's tokens in earlier sentences: with the full name in every
sentence the name recurs), ``other_context`` (everything else: the rest of earlier sentences, punctuation).
:func:`role_shares` turns token attributions into each role's share of the total absolute attribution per example;
:func:`attribute` reports every role apart and two sums, each named for what it adds: ``subject_plus_relation_share``
(this sentence's subject and relation tokens: the paper's signature, higher when the model reads the fact from them
rather than from the whole context) and ``subject_relation_preceding_share`` (the same plus the answer-preceding
token, which predicts the value and usually carries the largest share of all).

The attributed input is the *output* of the token embedding module (:func:`mechrecall.arch.embedding`), fed back
through ``inputs_embeds=``: Gemma's embedding multiplies by ``sqrt(d_model)`` inside its forward and its decoder does
not scale ``inputs_embeds`` again, so Gemma is attributed in the space its blocks see (the baseline's mean embedding is
scaled the same way, :func:`mechrecall.arch.embed_scale`); GPT-2 adds its learned positions after ``inputs_embeds``,
which leaves them out of the attribution, as wanted. Everything runs on the model's device; the target log-prob, the
integrated-gradient sums and the returned attributions are float32 whatever the model's dtype, and results come
back on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechrecall import arch
from mechrecall.devices import model_device, to_cpu
from mechrecall.facts import Example
from mechrecall.patching.prompts import fact_inputs

__all__ = [
    "ROLES",
    "RoleInputs",
    "role_inputs",
    "baseline_embeds",
    "IGResult",
    "integrated_gradients",
    "gradient_x_input",
    "occlusion_by_role",
    "role_shares",
    "attribute",
    "to_dataframe",
]

ROLES = ("subject", "relation", "answer_preceding", "subject_elsewhere", "other_context")


@dataclass
class RoleInputs:
    """Prompts (right-padded), readout, answer token and a boolean mask per role over positions."""

    input_ids: Tensor
    readout: Tensor
    answer: Tensor
    roles: dict[str, Bool[Tensor, "batch pos"]]
    fixed: Bool[Tensor, "batch pos"]  # positions kept at their input value (bos, padding)

    def to(self, device) -> RoleInputs:
        """The same inputs on ``device`` (the model's: inputs go where the model lives)."""
        return RoleInputs(
            self.input_ids.to(device),
            self.readout.to(device),
            self.answer.to(device),
            {r: m.to(device) for r, m in self.roles.items()},
            self.fixed.to(device),
        )


def role_inputs(tokenizer, examples: Sequence[Example], *, fix_first: bool = True) -> RoleInputs:
    """Prompts, readouts, answers and role masks of storage-format ``examples``.

    ``fix_first`` holds position 0 at its input value (in the baseline too, so it gets no attribution) also when it
    is not a ``<bos>`` token: a model trained without ``<bos>`` (SmolLM2, GPT-2) uses its first token as the attention
    sink, and a path that moves that token's embedding moves every later position's attention. Measured on SmolLM2
    (6 storage prompts, 64 Gauss-Legendre steps): median ``|delta| / |gap|`` 1.2 with position 0 attributed, 0.14
    with it fixed. A ``<bos>`` at position 0 is fixed either way: the lab presets' word-level tokenizer adds one, so
    their numbers do not depend on this; SmolLM2's tokenizer does not (the ``smollm2`` preset's do). The cost: a role whose first token is position 0 (the subject of a biography's first
    sentence) is attributed without that token."""
    from mechrecall.tokenization import encode_example

    base = fact_inputs(tokenizer, examples, roles=("final",))
    B, T = base.input_ids.shape
    masks = {r: torch.zeros(B, T, dtype=torch.bool) for r in ROLES}
    fixed = torch.ones(B, T, dtype=torch.bool)
    bos = tokenizer.bos_token_id
    for i, ex in enumerate(examples):
        enc = encode_example(tokenizer, ex)
        n = enc.prompt_len
        fixed[i, :n] = False
        if (fix_first and n > 1) or (bos is not None and enc.input_ids[0] == bos):
            fixed[i, 0] = True
        final = n - 1
        masks["answer_preceding"][i, final] = True
        masks["subject"][i, [p for p in enc.roles.get("subject", ()) if p != final]] = True
        masks["relation"][i, [p for p in enc.roles.get("relation", ()) if p != final]] = True
        subject_ids = {enc.input_ids[p] for p in enc.roles.get("subject", ())}
        for p in range(n):
            if enc.input_ids[p] in subject_ids:
                masks["subject_elsewhere"][i, p] = True
    for r in ("subject", "relation", "answer_preceding"):
        masks[r] &= ~fixed
    taken = masks["subject"] | masks["relation"] | masks["answer_preceding"]
    masks["subject_elsewhere"] &= ~taken & ~fixed
    masks["other_context"] = ~taken & ~fixed & ~masks["subject_elsewhere"]
    return RoleInputs(base.input_ids, base.readout, base.answer, masks, fixed)


def _target(model, embeds: Tensor, readout: Tensor, answer: Tensor) -> Float[Tensor, " batch"]:
    """Log-probability (float32) of ``answer`` at position ``readout`` of each row, from input embeddings.

    The decoder stack runs on every position and the unembedding at the readout alone (a 262k-token vocabulary
    would otherwise spend most of each integrated-gradients step on logits nobody reads); the result is the full
    forward's, as ``tests/test_architectures.py`` checks."""
    rows = torch.arange(embeds.shape[0], device=embeds.device)
    normed = arch.base_model(model)(inputs_embeds=embeds).last_hidden_state
    at = readout.to(normed.device)
    logits = arch.normed_to_logits(model, normed[rows.to(normed.device), at])
    return logits.float().log_softmax(-1).gather(1, answer.to(logits.device)[:, None])[:, 0]


def _embeds(model, ids: Tensor) -> Tensor:
    """What the token embedding module outputs for ``ids`` (Gemma: already scaled), on the model's device."""
    return arch.embedding(model)(ids.to(model_device(model))).detach()


def baseline_embeds(model, inputs: RoleInputs) -> Tensor:
    """The mean token embedding at attributed positions, the input itself at fixed ones (bos, padding).

    The mean is taken in the embedding module's output space (its ``.weight`` mean times
    :func:`mechrecall.arch.embed_scale`: Gemma's ``sqrt(d_model)``), in float32, then cast to the model's dtype.
    On the model's device.
    """
    x = _embeds(model, inputs.input_ids)
    weight = arch.embedding(model).weight.detach()
    mean = weight.mean(0) if weight.dtype == torch.float32 else weight.float().mean(0)
    scale = arch.embed_scale(model)
    if scale != 1.0:
        mean = mean.float() * torch.tensor(scale, dtype=weight.dtype).float()
    mean = mean.to(x.dtype)
    return torch.where(inputs.fixed.to(x.device)[..., None], x, mean.expand_as(x))


@dataclass
class IGResult:
    attributions: Float[Tensor, "batch pos"]  # summed over the embedding dimension
    delta: Float[Tensor, " batch"]  # sum(attributions) - (f(x) - f(baseline))
    gap: Float[Tensor, " batch"]  # f(x) - f(baseline)
    steps: int  # the most quadrature steps any example was computed with
    converged: bool  # every example within tolerance
    example_steps: list[int] | None = None  # the steps each example's attribution was computed with
    example_converged: list[bool] | None = None  # False: still outside the tolerance at ``max_steps``


def _ig_once(model, x: Tensor, baseline: Tensor, readout, answer, steps: int, batch_size: int) -> Tensor:
    """``(x - baseline) * sum_i w_i grad f(baseline + a_i (x - baseline))``, accumulated in float32.

    The (step, example) pairs are flattened and run ``batch_size`` rows a forward, as Captum expands its batch: a few
    examples at many steps make a few large forwards instead of many small ones, which is what keeps a CPU busy."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(0.5 * (nodes + 1), dtype=torch.float32, device=x.device)  # Captum's "gausslegendre" on [0, 1]
    step_sizes = torch.tensor(0.5 * weights, dtype=torch.float32, device=x.device)
    n = x.shape[0]
    diff = x.float() - baseline.float()
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for start in range(0, steps * n, batch_size):
        k = torch.arange(start, min(start + batch_size, steps * n), device=x.device)
        ex, st = k % n, k // n
        point = (baseline[ex].float() + alphas[st, None, None] * diff[ex]).to(x.dtype).requires_grad_(True)
        out = _target(model, point, readout[ex], answer[ex]).sum()
        (g,) = torch.autograd.grad(out, point)
        total.index_add_(0, ex, step_sizes[st, None, None] * g.float())
    return diff * total


def integrated_gradients(
    model,
    inputs: RoleInputs,
    *,
    steps: int = 32,
    max_steps: int = 256,
    rtol: float = 0.05,
    batch_size: int = 64,
) -> IGResult:
    """Integrated gradients of the answer log-prob w.r.t. input embeddings; doubles ``steps`` (up to ``max_steps``)
    until each example's completeness gap ``|delta| <= rtol * |f(x) - f(baseline)| + 1e-3``.

    Refinement is per example: an example that has converged keeps the attribution of the first step count that
    satisfied it, and only the others are recomputed at twice the steps (Gauss-Legendre grids are not nested, so
    nothing is reused): the prompts that converge early stop costing anything. ``example_steps`` records each
    example's count and ``example_converged`` which ones met the tolerance.

    Runs on the model's device; attributions, deltas and gaps are float32 on the CPU."""
    inputs = inputs.to(model_device(model))
    x = _embeds(model, inputs.input_ids)
    baseline = baseline_embeds(model, inputs)
    with torch.no_grad():
        gap = _target(model, x, inputs.readout, inputs.answer) - _target(model, baseline, inputs.readout, inputs.answer)
    if x.shape[0] == 0:
        raise ValueError("integrated_gradients needs at least one example")
    attr = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
    delta = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    used = torch.zeros(x.shape[0], dtype=torch.long)
    todo = torch.arange(x.shape[0], device=x.device)
    while True:
        a = _ig_once(model, x[todo], baseline[todo], inputs.readout[todo], inputs.answer[todo], steps, batch_size)
        attr[todo] = a.sum(-1)
        delta[todo] = attr[todo].sum(-1) - gap[todo]
        used[todo.cpu()] = steps
        ok = delta[todo].abs() <= rtol * gap[todo].abs() + 1e-3
        todo = todo[~ok]
        if len(todo) == 0 or steps * 2 > max_steps:
            converged = torch.ones(x.shape[0], dtype=torch.bool)
            converged[todo.cpu()] = False
            return IGResult(
                to_cpu(attr), to_cpu(delta), to_cpu(gap), int(used.max()), len(todo) == 0, used.tolist(),
                converged.tolist(),
            )  # fmt: skip
        steps *= 2


def gradient_x_input(model, inputs: RoleInputs) -> Float[Tensor, "batch pos"]:
    """Gradient x (input - baseline) per token, summed over the embedding (float32, CPU; 0 at fixed positions)."""
    inputs = inputs.to(model_device(model))
    x = _embeds(model, inputs.input_ids).requires_grad_(True)
    out = _target(model, x, inputs.readout, inputs.answer).sum()
    (g,) = torch.autograd.grad(out, x)
    attr = (g.float() * (x - baseline_embeds(model, inputs)).float()).sum(-1)
    return to_cpu(attr.masked_fill(inputs.fixed, 0.0))


@torch.no_grad()
def occlusion_by_role(model, inputs: RoleInputs) -> dict[str, Float[Tensor, " batch"]]:
    """Drop of the answer log-prob when a role's token embeddings are set to the baseline (one forward per role;
    float32, CPU)."""
    inputs = inputs.to(model_device(model))
    x = _embeds(model, inputs.input_ids)
    base = baseline_embeds(model, inputs)
    clean = _target(model, x, inputs.readout, inputs.answer)
    out = {}
    for role, m in inputs.roles.items():
        out[role] = to_cpu(clean - _target(model, torch.where(m[..., None], base, x), inputs.readout, inputs.answer))
    return out


def role_shares(attr: Float[Tensor, "batch pos"], inputs: RoleInputs) -> dict[str, Float[Tensor, " batch"]]:
    """Each role's share of the example's total absolute token attribution (float32, on ``attr``'s device)."""
    a = attr.float().abs().masked_fill(inputs.fixed.to(attr.device), 0.0)
    total = a.sum(-1).clamp_min(1e-12)
    return {r: (a * m.to(attr.device)).sum(-1) / total for r, m in inputs.roles.items()}


def attribute(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int = 32,
    max_steps: int = 128,
    fix_first: bool = True,
    batch_size: int = 64,
) -> dict:
    """All three attributions for ``examples``; per-example role shares (IG, grad x input) and occlusion drops
    (``fix_first``: :func:`role_inputs`). ``batch_size``: rows of one integrated-gradients forward (lower it when
    activations of that many prompts do not fit)."""
    inputs = role_inputs(tokenizer, examples, fix_first=fix_first)
    was = model.training
    model.eval()
    ig = integrated_gradients(model, inputs, steps=steps, max_steps=max_steps, batch_size=batch_size)
    gxi = gradient_x_input(model, inputs)
    occ = occlusion_by_role(model, inputs)
    model.train(was)
    shares = role_shares(ig.attributions, inputs)
    gxi_shares = role_shares(gxi, inputs)
    sr = shares["subject"] + shares["relation"]
    srp = sr + shares["answer_preceding"]
    return {
        "n": len(examples),
        "first_position_fixed": fix_first,
        "subject_plus_relation_share": float(sr.mean()),
        "subject_plus_relation_share_per_fact": sr.tolist(),
        "subject_relation_preceding_share": float(srp.mean()),
        "subject_relation_preceding_share_per_fact": srp.tolist(),
        "per_role": {r: float(v.mean()) for r, v in shares.items()},
        "per_role_grad_x_input": {r: float(v.mean()) for r, v in gxi_shares.items()},
        "occlusion_drop": {r: float(v.mean()) for r, v in occ.items()},
        "ig_convergence": {
            "steps": ig.steps,
            "example_steps": ig.example_steps,
            "n_unconverged": ig.example_converged.count(False),
            "converged": ig.converged,
            "max_abs_delta": float(ig.delta.abs().max()),
            "mean_abs_gap": float(ig.gap.abs().mean()),
        },
    }


def to_dataframe(result: dict, label: str = "") -> pd.DataFrame:
    steps = result.get("ig_convergence", {}).get("example_steps")  # absent from results written by older versions
    df = pd.DataFrame(
        {
            "model": label,
            "fact": range(result["n"]),
            "subject_plus_relation_share": result["subject_plus_relation_share_per_fact"],
            "subject_relation_preceding_share": result["subject_relation_preceding_share_per_fact"],
        }
    )
    if steps is not None:
        df["ig_steps"] = steps
    return df
