"""Gradient and representation consistency between the storage and query formats of the same facts.

- **Gradient consistency**: cosine between a fact's storage-format and query-format answer-loss gradients, over all
  parameters and per parameter group (layer, module type), against a *mismatched* baseline (the storage gradient
  of fact i vs the query gradient of fact i+1 in a fixed derangement), with bootstrap confidence intervals.
- **Representation consistency**: cosine between the two formats' hidden states of the same fact per layer and
  role, against the mismatched baseline; linear CKA; and a cross-format linear probe (fit on storage-format
  states, test on query-format states) predicting the answer.

All functions take tensors (or the caches of :mod:`mechrecall.cache` / :mod:`mechrecall.gradients`) and return
small dataclasses that convert to DataFrames. Cosines, CKA and probes are computed in float32 (on the device the
tensors live on) and per-fact results come back on the CPU. Parameter groups are read through :mod:`mechrecall.arch`
(:func:`param_group`), so every supported architecture gets layer and module groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechrecall import arch
from mechrecall.devices import check_memory, model_device, nbytes, release_memory
from mechrecall.facts import FactSet


def derangement(n: int, seed: int = 0) -> Int[Tensor, " n"]:
    """A permutation with no fixed point (for mismatched-fact baselines); needs n >= 2."""
    if n < 2:
        raise ValueError("a mismatched baseline needs at least two facts")
    g = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(1, n, (1,), generator=g))
    perm = torch.randperm(n, generator=g)
    out = torch.empty(n, dtype=torch.long)
    out[perm] = perm.roll(shift)
    return out


def bootstrap_ci(
    values: Float[Tensor, " n"], n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (n_boot, len(values)), generator=g)
    means = values[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2]))
    return float(lo), float(hi)


@dataclass
class Consistency:
    """Per-fact same-fact and mismatched cosines for one group (all parameters, a layer, a role at a layer...)."""

    group: str
    same: Float[Tensor, " fact"]
    mismatched: Float[Tensor, " fact"]

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict:
        return {
            "group": self.group,
            "mean_cos": float(self.same.mean()),
            "ci": bootstrap_ci(self.same, n_boot, seed=seed),
            "baseline_mean_cos": float(self.mismatched.mean()),
            "margin": float((self.same - self.mismatched).mean()),
            "margin_ci": bootstrap_ci(self.same - self.mismatched, n_boot, seed=seed),
            "n": len(self.same),
        }


def to_dataframe(results: Sequence[Consistency]) -> pd.DataFrame:
    rows = []
    for r in results:
        for i, (s, m) in enumerate(zip(r.same.tolist(), r.mismatched.tolist())):
            rows.append({"group": r.group, "fact": i, "same_cos": s, "mismatched_cos": m})
    return pd.DataFrame(rows)


def cosine_consistency(
    group: str, a: Float[Tensor, "fact d"], b: Float[Tensor, "fact d"], seed: int = 0
) -> Consistency:
    """Cosine of row i of ``a`` with row i of ``b`` (same fact) and with a deranged row (mismatched), in float32;
    the cosines come back on the CPU."""
    a, b = a.float(), b.float()
    perm = derangement(a.shape[0], seed).to(b.device)
    same, mismatched = F.cosine_similarity(a, b, dim=-1), F.cosine_similarity(a, b[perm], dim=-1)
    return Consistency(group, same.cpu(), mismatched.cpu())


_PLACE_GROUPS = {"embed": "embed", "pos_embed": "embed", "final_norm": "final_norm", "unembed": "head"}


def param_group(name: str, by: str = "layer", model: Any = None) -> str:
    """Group an HF parameter name: ``by="layer"`` -> ``layer.3`` / ``embed`` / ``final_norm`` / ``head``;
    ``by="module"`` -> ``attn.<module>``, ``mlp.<module>``, ``norm``, ``embed``, ``head``; ``by="layer_module"`` ->
    both (``layer.3/attn.<module>``).

    ``<module>`` is the name of the module holding the parameter inside the block's attention or MLP (its last path
    part: Llama-style models get one group per projection, the query, key, value and output ones and the gate, up
    and down ones), and a fused weight one group for its fused module (GPT-NeoX's and GPT-2's query/key/value,
    Phi-3's query/key/value and gate/up); every other parameter of a block is one of its norms (``norm``), the
    embeddings (GPT-2's positions too) are ``embed``, the final norm is layer ``final_norm`` / module ``norm`` and the
    unembedding ``head``. Where a parameter sits is read by :func:`mechrecall.arch.place_of` for ``model`` (a
    ``*ForCausalLM`` or its config); without it, from the name alone (the same for the supported families).
    Parameters the architecture table does not place (Gemma 3's vision tower) are ``other``.
    """
    if by not in ("layer", "module", "layer_module"):
        raise ValueError(f"unknown grouping {by!r}; expected 'layer', 'module' or 'layer_module'")
    place = arch.place_of(name, model)
    if place is None:
        layer = module = "other"
    elif place.layer is not None:
        layer = f"layer.{place.layer}"
        module = f"{place.part}.{place.leaf}" if place.part in ("attn", "mlp") else "norm"
    else:
        layer = _PLACE_GROUPS[place.part]
        module = "norm" if place.part == "final_norm" else layer
    return {"layer": layer, "module": module, "layer_module": f"{layer}/{module}"}[by]


def gradient_consistency(
    storage: dict[str, Float[Tensor, "fact ..."]],
    query: dict[str, Float[Tensor, "fact ..."]],
    by: Sequence[str] = ("layer", "module"),
    seed: int = 0,
    model: Any = None,
) -> list[Consistency]:
    """Per-fact storage-vs-query gradient cosines: ``all`` parameters first, then each group of ``by``
    (:func:`param_group` for ``model``, or from the names when it is not given). Cosines in float32."""
    if storage.keys() != query.keys():
        raise ValueError("storage and query gradients must cover the same parameters")
    flat_s = torch.cat([g.flatten(1).float() for g in storage.values()], 1)
    flat_q = torch.cat([g.flatten(1).float() for g in query.values()], 1)
    out = [cosine_consistency("all", flat_s, flat_q, seed)]
    for kind in by:
        groups: dict[str, list[str]] = {}
        for n in storage:
            groups.setdefault(param_group(n, kind, model), []).append(n)
        for gname, names in groups.items():
            s = torch.cat([storage[n].flatten(1).float() for n in names], 1)
            q = torch.cat([query[n].flatten(1).float() for n in names], 1)
            out.append(cosine_consistency(f"{kind}:{gname}", s, q, seed))
    return out


def representation_consistency(
    storage_cache, query_cache, site: str = "resid_post", seed: int = 0
) -> list[Consistency]:
    """Per layer and role: cosine of the two formats' states of the same fact vs mismatched facts."""
    if storage_cache.roles != query_cache.roles:
        raise ValueError(f"caches have different roles: {storage_cache.roles} vs {query_cache.roles}")
    out = []
    for layer in range(storage_cache.n_layers):
        for role in storage_cache.roles:
            out.append(
                cosine_consistency(
                    f"{site}.{layer}.{role}", storage_cache[site, layer, role], query_cache[site, layer, role], seed
                )
            )
    return out


def linear_cka(x: Float[Tensor, "n d1"], y: Float[Tensor, "n d2"]) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) between two sets of states of the same n items (float32)."""
    x, y = x.float(), y.float()
    x = x - x.mean(0)
    y = y - y.mean(0)
    hsic = (x.T @ y).pow(2).sum()
    return float(hsic / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def cross_format_probe(
    train_x: Float[Tensor, "n d"],
    train_y: Int[Tensor, " n"],
    test_x: Float[Tensor, "m d"],
    test_y: Int[Tensor, " m"],
    *,
    l2: float = 1e-2,
    steps: int = 300,
    lr: float = 0.1,
    seed: int = 0,
) -> dict:
    """Multinomial logistic-regression probe: fit on ``train_x`` (e.g. storage-format states), score accuracy on
    ``test_x`` (query-format states of other or the same facts). Features are standardised with train statistics."""
    torch.manual_seed(seed)
    train_x, test_x = train_x.float().cpu(), test_x.float().cpu()
    train_y, test_y = train_y.cpu(), test_y.cpu()
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    w = torch.zeros(a.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=lr, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = float(((a @ w + bias).argmax(1) == train_y).float().mean())
        test_acc = float(((b @ w + bias).argmax(1) == test_y).float().mean())
    return {"train_accuracy": train_acc, "test_accuracy": test_acc, "n_train": len(train_y), "n_test": len(test_y)}


def summaries(results: Sequence[Consistency], n_boot: int = 1000) -> list[dict]:
    return [r.summary(n_boot) for r in results]


__all__ = [
    "Consistency",
    "bootstrap_ci",
    "cosine_consistency",
    "cross_format_probe",
    "derangement",
    "grad_batch_for",
    "gradient_memory",
    "gradient_consistency",
    "linear_cka",
    "measure",
    "param_group",
    "representation_consistency",
    "summaries",
    "to_dataframe",
]


# ------------------------------------------------------------------------------------------- end-to-end measures
def _groups(names: Sequence[str], by: Sequence[str], model: Any) -> list[tuple[str, list[int]]]:
    """``all`` first, then each group of each grouping in ``by``, in :func:`gradient_consistency`'s order, as indices
    into ``names``."""
    out = [("all", list(range(len(names))))]
    for kind in by:
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(param_group(n, kind, model), []).append(i)
        out += [(f"{kind}:{g}", idx) for g, idx in groups.items()]
    return out


def _products(a: dict[str, Tensor], b: dict[str, Tensor]) -> Float[Tensor, "3 param"]:
    """Per parameter tensor: (a . b, a . a, b . b), each summed in float32 where the tensors live, returned in
    float64 on the CPU (one transfer)."""
    rows = []
    for n in a:
        x, y = a[n].float(), b[n].float()
        rows.append(torch.stack([(x * y).sum(), (x * x).sum(), (y * y).sum()]))
    return torch.stack(rows).double().cpu().T


def _group_cosines(products: Tensor, groups: list[tuple[str, list[int]]]) -> Float[Tensor, " group"]:
    out = []
    for _, idx in groups:
        dot, aa, bb = products[:, idx].sum(1)
        out.append(float(dot / max(float((aa * bb).sqrt()), 1e-12)))
    return torch.tensor(out, dtype=torch.float32)


def _cycles(perm: Tensor) -> list[list[int]]:
    """The cycles of a permutation, each from its smallest element: ``c[t + 1] == perm[c[t]]``."""
    seen, out = set(), []
    for start in range(len(perm)):
        if start in seen:
            continue
        cycle, i = [], start
        while i not in seen:
            seen.add(i)
            cycle.append(i)
            i = int(perm[i])
        out.append(cycle)
    return out


def _sketch_cosines(a: Tensor, b: Tensor, groups: list[tuple[str, list[int]]]) -> Float[Tensor, " group"]:
    """Group cosines estimated from per-parameter sketches ``[param, k]``: a group's sketch is its rows' sum."""
    out = []
    for _, idx in groups:
        x, y = a[idx].sum(0).double(), b[idx].sum(0).double()
        out.append(float(x @ y / max(float(x.norm() * y.norm()), 1e-12)))
    return torch.tensor(out, dtype=torch.float32)


def _streamed_batch(model, tokenizer, s_ex, q_ex, groups, perm, sketch=None) -> tuple[Tensor, Tensor]:
    """Same-fact and mismatched (``perm``) cosines per group for one batch of facts, holding at most three
    gradients at once: each cycle of ``perm`` is walked keeping its first query gradient, the current storage
    gradient and the next query gradient. With ``sketch`` (a :class:`mechrecall.gradients.CountSketch`) those three
    are sketches, made where each gradient is computed, and the cosines are estimates."""
    from mechrecall.gradients import answer_batch, iter_example_grads

    def grad(ex):
        return next(iter_example_grads(model, answer_batch(tokenizer, [ex]), reduce=sketch))

    def cosines(a, b):
        return _sketch_cosines(a, b, groups) if sketch is not None else _group_cosines(_products(a, b), groups)

    same = torch.zeros(len(groups), len(s_ex))
    mismatched = torch.zeros(len(groups), len(s_ex))
    for cycle in _cycles(perm):
        first = grad(q_ex[cycle[0]])
        current = first
        for t, i in enumerate(cycle):
            s = grad(s_ex[i])
            same[:, i] = cosines(s, current)
            current = None  # (the first query gradient stays referenced by ``first``)
            current = grad(q_ex[cycle[t + 1]]) if t + 1 < len(cycle) else first
            mismatched[:, i] = cosines(s, current)
            del s
        del first, current
    return same, mismatched


def streamed_gradient_consistency(
    model,
    tokenizer,
    storage: Sequence,
    query: Sequence,
    *,
    by: Sequence[str] = ("layer", "module"),
    batch_size: int = 16,
    seed: int = 0,
    streamed: bool | None = None,
    sketch_dim: int | None = None,
) -> list[Consistency]:
    """:func:`gradient_consistency` over aligned (storage, query) example lists, one batch of facts at a time.

    The mismatched baseline pairs facts inside each batch of ``batch_size`` (a derangement seeded by ``seed`` plus
    the batch's start), so batches of at least two facts are needed. Groups are the model's own
    (:func:`param_group` with ``model``).

    Two ways to the same numbers (within float tolerance): ``streamed=False`` holds a batch's per-example gradients
    of both formats at once (``vmap``; fast for small models); ``streamed=True`` computes one gradient at a time
    with ordinary backwards and keeps at most three (memory: the model, its gradient buffers, three gradients and
    small per-parameter sums, whatever the batch size; any attention implementation); None (default) streams when a
    batch's two formats would hold more than :data:`mechrecall.gradients.VMAP_BUDGET` bytes.

    ``sketch_dim=k`` (streamed) keeps a :class:`mechrecall.gradients.CountSketch` of each gradient instead of the
    gradient (``k`` floats per parameter tensor): memory is then the model and its gradient buffers, and the cosines
    are estimates with an error of order ``1 / sqrt(k)``, for models where even three gradients do not fit.
    """
    from mechrecall.gradients import VMAP_BUDGET, answer_batch, per_example_grads, select_params, vmap_bytes

    if len(storage) != len(query):
        raise ValueError("storage and query examples must be aligned fact by fact")
    if streamed is None:
        streamed = sketch_dim is not None or 2 * vmap_bytes(select_params(model), batch_size) > VMAP_BUDGET
    if sketch_dim is not None and not streamed:
        raise ValueError("a gradient sketch is made on the streamed path: pass streamed=True (or None)")
    from mechrecall.gradients import CountSketch

    names = list(select_params(model))
    groups = _groups(names, by, model) if streamed else None
    sketch = CountSketch(names, sketch_dim, seed) if sketch_dim is not None else None
    parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    for start in range(0, len(storage), batch_size):
        s_ex, q_ex = storage[start : start + batch_size], query[start : start + batch_size]
        if len(s_ex) < 2:
            break
        if streamed:
            same, mismatched = _streamed_batch(
                model, tokenizer, s_ex, q_ex, groups, derangement(len(s_ex), seed + start), sketch
            )
            for g, (name, _) in enumerate(groups):
                parts.setdefault(name, []).append((same[g], mismatched[g]))
            continue
        gs = per_example_grads(model, answer_batch(tokenizer, s_ex))
        gq = per_example_grads(model, answer_batch(tokenizer, q_ex))
        for r in gradient_consistency(gs, gq, by, seed=seed + start, model=model):
            parts.setdefault(r.group, []).append((r.same, r.mismatched))
        freed = nbytes(gs.values()) + nbytes(gq.values())
        del gs, gq
        release_memory(freed)  # gigabytes a batch on a pretrained model: without it the heap only grows
    return [Consistency(g, torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for g, v in parts.items()]


# Per-example gradients are held for one batch of facts at a time: 2 formats x batch x the parameters' bytes, and
# vmap's intermediates about double that again (SmolLM2-135M, 4 facts: 18 GB peak). This is the gradients' budget.
GRAD_BATCH_BYTES = 2 << 30


def gradient_memory(model, streamed: bool, grad_batch: int, sketch_dim: int | None = None) -> int:
    """Bytes gradient consistency allocates beyond the loaded model: streamed, the gradient buffers, three gradients
    and ~1 GiB for one example's activations; sketched, the buffers and the 1 GiB; with vmap, both formats' gradients
    of ``grad_batch`` facts and as much again of intermediates, plus the same 1 GiB."""
    size = nbytes(model.parameters())
    if sketch_dim is not None:
        return size + (1 << 30)
    return (4 * size if streamed else 4 * grad_batch * size) + (1 << 30)


def grad_batch_for(model, budget: int = GRAD_BATCH_BYTES) -> int:
    """Facts per per-example-gradient batch for ``model``: as many as fit ``budget`` bytes of gradients of both
    formats, from 2 (the mismatched baseline pairs facts within a batch) to 16. A function of the model alone (its
    parameter count and dtype), never of free memory, so that the same model gives the same numbers on any machine:
    16 for the lab models, 2 for SmolLM2-135M and larger (16 there would hold about 70 GB)."""
    size = nbytes(model.parameters())
    return max(2, min(16, budget // (2 * size)))


def measure(
    model,
    tokenizer,
    facts: FactSet,
    *,
    grad_facts: int = 240,
    seed: int = 0,
    grad_batch: int | None = None,
    streamed: bool | None = None,
    sketch_dim: int | None = None,
) -> dict:
    """Gradient and representation consistency of one model on ``facts`` (first storage and first query text each).

    Returns a JSON-able dict; ``gradient`` uses the first ``grad_facts`` facts. The mismatched baseline pairs facts
    within batches of ``grad_batch`` (None: :func:`grad_batch_for` the model), so a different ``grad_batch`` draws a
    different baseline; the batch used is in the result. ``streamed`` chooses how per-example gradients are held
    (:func:`streamed_gradient_consistency`: None streams when a batch's vmap would exceed
    :data:`mechrecall.gradients.VMAP_BUDGET`, so a pretrained model needs the model, its gradient buffers and three
    gradients); the choice is in the result and does not change the numbers beyond float tolerance. ``sketch_dim``
    estimates the gradient cosines from CountSketches instead (:func:`streamed_gradient_consistency`; memory: the
    model and its gradient buffers), for models where three gradients do not fit.
    """
    from mechrecall.cache import cache_residuals

    storage = facts.examples("storage", templates=[0])
    query = facts.examples("query", templates=[0])
    if len(storage) != len(query):
        raise ValueError("every fact needs a storage and a query text for consistency measures")
    model.eval()
    grad_batch = grad_batch_for(model) if grad_batch is None else grad_batch
    from mechrecall.gradients import VMAP_BUDGET, select_params, vmap_bytes

    if streamed is None:
        streamed = sketch_dim is not None or 2 * vmap_bytes(select_params(model), grad_batch) > VMAP_BUDGET
    mode = f"sketched to {sketch_dim}" if sketch_dim else "streamed" if streamed else f"vmap over {grad_batch} facts"
    check_memory(
        f"gradient consistency ({mode})",
        gradient_memory(model, streamed, grad_batch, sketch_dim),
        model_device(model),
        "a gradient sketch needs the least (--grad-sketch 16384: the model and its gradient buffers), or measure on a "
        "device with more free memory (a GPU: --device cuda; or --dtype bf16)",
    )
    grads = streamed_gradient_consistency(
        model, tokenizer, storage[:grad_facts], query[:grad_facts], seed=seed, batch_size=grad_batch, streamed=streamed,
        sketch_dim=sketch_dim,
    )  # fmt: skip
    gsum = {r.group: r.summary(seed=seed) for r in grads}
    cs = cache_residuals(model, tokenizer, storage)
    cq = cache_residuals(model, tokenizer, query)
    reps = representation_consistency(cs, cq, "resid_post", seed=seed)
    rsum = {r.group: r.summary(seed=seed) for r in reps}
    n_layers = cs.n_layers
    roles = cs.roles
    per_layer = {role: [rsum[f"resid_post.{L}.{role}"]["mean_cos"] for L in range(n_layers)] for role in roles}
    base = {role: [rsum[f"resid_post.{L}.{role}"]["baseline_mean_cos"] for L in range(n_layers)] for role in roles}
    last = rsum[f"resid_post.{n_layers - 1}.subject"]
    values = sorted({ex.answer for ex in storage})
    y = torch.tensor([values.index(ex.answer) for ex in storage])
    probe = cross_format_probe(
        cs["resid_post", n_layers - 1, "final"], y, cq["resid_post", n_layers - 1, "final"], y, seed=seed
    )
    return {
        "n_facts": len(storage),
        "facts": facts.source,  # what was measured: which fact set (a lab run's held-out people, a fact file, ...)
        "splits": facts.splits,
        "gradient": {
            "same_fact_mean_cos": gsum["all"]["mean_cos"],
            "ci": gsum["all"]["ci"],
            "baseline_mean_cos": gsum["all"]["baseline_mean_cos"],
            "margin_ci": gsum["all"]["margin_ci"],
            "n_facts": gsum["all"]["n"],
            "grad_batch": grad_batch,
            "streamed": streamed,
            "sketch_dim": sketch_dim,
            "groups": {k: v for k, v in gsum.items() if k != "all"},
        },
        "representation": {
            "per_layer": per_layer,
            "baseline_per_layer": base,
            "subject_last_layer_margin": last["margin"],
            "subject_last_layer_margin_ci": last["margin_ci"],
            "final_last_layer_margin": rsum[f"resid_post.{n_layers - 1}.final"]["margin"],
            "cka_final_per_layer": [
                linear_cka(cs["resid_post", L, "final"], cq["resid_post", L, "final"]) for L in range(n_layers)
            ],
            "probe_storage_to_query": probe,
        },
    }
