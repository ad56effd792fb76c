"""Shared-update masks of a two-stage / mixed checkpoint pair: statistics, ablation, grafting, JSON + figures.

Importance comes from each checkpoint's training trace (``trace.safetensors``, :mod:`mechrecall.lab.trace`): the
storage mask is the top ``k`` of storage-format importance, the query mask the top ``k`` of query-format importance,
the shared mask their intersection. Ablation resets a mask to the base (pre-fine-tuning) weights of the same model;
grafting copies a regime's shared parameters into the other regime's model (both start from the same base). Every
intervention is compared with size-matched random masks (same count in every matrix, several draws) and with the
format-only masks (storage minus query, query minus storage). Recall is greedy exact-match QA on the held-out people
(measurement only: nothing here is tuned on it) and on the trained people.

Any two checkpoints on your own facts (``facts=``: a fact file, ``datasets.Dataset`` or
:class:`~mechrecall.facts.FactSet`; registry names, folders, Hugging Face ids, GGUF): there is no training trace, so
each format's importance is computed after the fact (``importance=``, recorded in ``masks.json``):

- ``posthoc`` (default without ``base``): mean |per-example answer-loss gradient| of the facts' first text of that
  format on the checkpoint (:func:`mechrecall.masks.posthoc_importance`);
- ``posthoc_x_update`` (default with ``base``): the same times the update size ``|theta_ft - theta_base|``
  (:func:`mechrecall.masks.update_importance`), i.e. the parameters fine-tuning moved that each format's loss is
  sensitive to;
- ``update``: the update size alone, the same map for both formats (their masks coincide: only the ablation is
  informative).

Ablation resets the mask to ``base`` when one is given, else to each matrix's mean over its unmasked entries
(``ablation.mode`` says which). Recall is greedy exact match of the query texts of the facts' ``heldout`` and
``train`` splits (those present; else the first split, or all facts as ``"unsplit"``); ``primary_split`` names the
one the headline drops are measured on. Grafting needs the two checkpoints to share parameter names and shapes (it
is recorded as skipped otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mechrecall import arch
from mechrecall.checkpoint import CheckpointError
from mechrecall.devices import model_device, model_dtype
from mechrecall.facts import FactSet
from mechrecall.gradients import gradient_stats
from mechrecall.interventions import ablate, graft, recall_under, state_of, with_random_controls
from mechrecall.io import atomic_write_files, finite
from mechrecall.lab.models import lab_dataset
from mechrecall.lab.trace import GradientTrace
from mechrecall.loading import LoadedModel, load_model
from mechrecall.masks import (
    MaskComparison,
    block_matrices,
    localize,
    mask_count,
    mask_minus,
    masked_cosines,
    posthoc_importance,
    random_overlap,
    topk_mask,
    update_importance,
)
from mechrecall.tokenization import check_tokenization

SPLITS = ("heldout", "train")
POINTS = 100.0  # drops are reported in percentage points of exact-match recall
IMPORTANCES = ("posthoc", "posthoc_x_update", "update")


def base_source(loaded: LoadedModel, registry=None) -> str:
    """The base checkpoint of a lab checkpoint: its registry entry's ``base_model``, else ``<run>/data/base``."""
    from mechrecall.registry import RegistryError, resolve

    try:
        _, entry = resolve(loaded.source, registry)
        if entry is not None and entry.base_model:
            return entry.base_model
    except RegistryError:
        pass
    guess = Path(loaded.location).parents[1] / "data" / "base"
    if guess.is_dir():
        return str(guess)
    raise CheckpointError(f"cannot tell the base checkpoint of {loaded.source!r}: pass base= explicitly")


def comparison(trace: GradientTrace, k: float, *, kind: str = "abs_grad", scope: str = "per_matrix") -> MaskComparison:
    return MaskComparison(
        topk_mask(trace.importance("storage", kind), k, scope=scope),
        topk_mask(trace.importance("query", kind), k, scope=scope),
        k,
    )


def _drop(before: dict, after: dict) -> dict:
    return {s: POINTS * (before[s] - after[s]) for s in before}


def _consistency_split(loaded: LoadedModel, dataset, shared, n_facts: int, chunk: int | None = None) -> dict:
    """Gradient cosine of the same held-out fact's two formats inside the shared set and outside it.

    ``dataset``: a lab dataset (its held-out people) or a pair ``(storage, query)`` of aligned example lists;
    ``chunk`` facts at a time (default: all at once; per-example gradients of a large model need a few).
    """
    from mechrecall.gradients import answer_batch, per_example_grads

    if isinstance(dataset, tuple):
        storage, query = dataset
    else:
        pids = dataset.pids("heldout")
        storage, query = dataset.storage_examples(pids), dataset.query_examples(pids, templates=[0])
    storage, query = storage[:n_facts], query[:n_facts]
    model = loaded.model
    params = {n: p.detach() for n, p in model.named_parameters() if n in shared}
    step = chunk or len(storage)
    parts: dict[str, list] = {"inside": [], "outside": []}
    for i in range(0, len(storage), step):
        gs = per_example_grads(model, answer_batch(loaded.tokenizer, storage[i : i + step]), params)
        gq = per_example_grads(model, answer_batch(loaded.tokenizer, query[i : i + step]), params)
        for w, c in masked_cosines(gs, gq, shared).items():
            parts[w].append(c.cpu())
        del gs, gq
    cos = {w: torch.cat(v) for w, v in parts.items()}
    return {w: {"mean_cos": float(c.mean()), "per_fact": c.tolist()} for w, c in cos.items()}


def run(
    two_stage: str,
    mixed: str,
    out: str | Path,
    *,
    base: str | None = None,
    registry: str | Path | None = None,
    k: float = 0.05,
    ks: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    draws: int = 5,
    sweep_draws: int = 2,
    kind: str = "abs_grad",
    scope: str = "per_matrix",
    consistency_facts: int = 64,
    seed: int = 0,
    facts=None,
    split: str | None = None,
    count: int | None = None,
    labels: Sequence[str] | None = None,
    importance: str | None = None,
    device=None,
    dtype=None,
    batch_size: int = 4,
    layers: Sequence[int] | None = None,
    recall_format: str = "query",
) -> dict:
    """Masks of a lab pair from its training traces; with ``facts`` of any two checkpoints (see the module
    docstring; ``count`` facts of ``split``, per-example gradients ``batch_size`` at a time)."""
    if facts is not None:
        return run_facts(
            two_stage, mixed, out, facts, base=base, registry=registry, k=k, ks=ks, draws=draws,
            sweep_draws=sweep_draws, scope=scope, consistency_facts=consistency_facts, seed=seed, split=split,
            count=count, labels=labels, importance=importance, device=device, dtype=dtype, batch_size=batch_size,
            layers=layers, recall_format=recall_format,
        )  # fmt: skip
    out = Path(out)
    from mechrecall.report.consistency import check_labels

    # the lab pair's keys are its regimes; ``labels`` renames them (e.g. two_stage / pre_instruction)
    first, second = check_labels(labels, 2) or ("two_stage", "mixed")
    models = {r: load_model(src, registry=registry, device=device, dtype=dtype, supported_only=True)
              for r, src in ((first, two_stage), (second, mixed))}  # fmt: skip
    dataset = lab_dataset(models[second])
    facts = dataset.factset()
    if models[first].meta.get("dataset_hash") != dataset.hash:
        raise CheckpointError(f"{two_stage!r} and {mixed!r} were trained on different datasets")
    base_loaded = load_model(base or base_source(models[second], registry), registry=registry, device=device,
                             dtype=dtype)  # fmt: skip
    base_sd = state_of(base_loaded.model)
    traces = {r: GradientTrace.load(m.location) for r, m in models.items()}
    states = {r: state_of(m.model) for r, m in models.items()}
    config = models[second].model.config
    other = {first: second, second: first}

    result: dict = {"k": k, "importance": f"trace:{kind}", "scope": scope, "units": "held-out QA percentage points"}
    if (first, second) != ("two_stage", "mixed"):
        result["labels"] = [first, second]
    result["dataset_hash"] = dataset.hash
    for regime, loaded in models.items():
        model, tok = loaded.model, loaded.tokenizer
        comp = comparison(traces[regime], k, kind=kind, scope=scope)
        shared = comp.shared
        entry = comp.stats(config)
        loc = localize(shared, config)
        entry["heads_fraction"] = (loc["heads"] / loc["heads_total"]).tolist()
        # recall of the model itself, then with its shared set reset to base, and the controls
        intact = recall_under(model, tok, facts, states[regime], SPLITS)
        abl = with_random_controls(
            model, tok, facts, shared, lambda m, r=regime: ablate(states[r], m, "base", base_sd),
            draws=draws, seed=seed, splits=SPLITS,
        )  # fmt: skip
        only = {
            "storage_only": mask_minus(comp.storage, comp.query),
            "query_only": mask_minus(comp.query, comp.storage),
        }
        fmt_only = {
            name: recall_under(model, tok, facts, ablate(states[regime], m, "base", base_sd), SPLITS)
            for name, m in only.items()
        }
        entry["recall"] = intact
        entry["ablation"] = {
            "mode": "base",
            "shared_drop": _drop(intact, abl["mask"])["heldout"],
            "random_drop_mean": POINTS * (intact["heldout"] - abl["random_mean"]["heldout"]),
            "random_drop_std": POINTS * abl["random_std"]["heldout"],
            "random_drops": [POINTS * (intact["heldout"] - v) for v in abl["random"]["heldout"]],
            "trained_shared_drop": _drop(intact, abl["mask"])["train"],
            "trained_random_drop_mean": POINTS * (intact["train"] - abl["random_mean"]["train"]),
            "format_only_drops": {name: _drop(intact, r) for name, r in fmt_only.items()},
            "format_only_counts": {name: mask_count(m) for name, m in only.items()},
            "n_masked": abl["n"],
        }
        # grafting: the other regime's model receives this regime's shared parameters
        recipient = other[regime]
        rmodel = models[recipient].model
        before = recall_under(rmodel, tok, facts, states[recipient], SPLITS)
        gr = with_random_controls(
            rmodel, tok, facts, shared, lambda m, r=regime, t=recipient: graft(states[t], states[r], m),
            draws=draws, seed=seed + 100, splits=SPLITS,
        )  # fmt: skip
        entry["grafting"] = {
            "recipient": recipient,
            "heldout_before": before["heldout"],
            "heldout_after": gr["mask"]["heldout"],
            "random_heldout_mean": gr["random_mean"]["heldout"],
            "random_heldout_std": gr["random_std"]["heldout"],
            "random_heldout": gr["random"]["heldout"],
            "trained_before": before["train"],
            "trained_after": gr["mask"]["train"],
            "donor_heldout": intact["heldout"],
        }
        entry["consistency"] = _consistency_split(loaded, dataset, shared, consistency_facts)
        entry["sweep"] = _sweep(models, regime, recipient, traces[regime], states, base_sd, facts, ks, kind, scope,
                                sweep_draws, seed, intact["heldout"])  # fmt: skip
        result[regime] = entry
    atomic_write_files(out, {"masks.json": result, "masks.html": figures_html(result, config)})
    return result


def _sweep(
    models,
    regime,
    recipient,
    trace,
    states,
    base_sd,
    facts,
    ks,
    kind,
    scope,
    draws,
    seed,
    intact: float,
    *,
    compare=None,
    ablation=None,
    primary: str = "heldout",
    splits=("heldout",),
    controls=None,
) -> list[dict]:
    """Shared-set size, ablation and grafting over mask sizes ``ks``; ``intact`` = the model's own ``primary`` recall.

    ``compare(k)`` builds the storage/query masks (default: from the training ``trace``); ``ablation(state, mask)``
    the ablated state (default: reset to ``base_sd``); ``recipient`` ``None`` skips grafting; ``controls(what, k,
    model, mask, make_state, seed)`` measures a mask and its random controls (default:
    :func:`~mechrecall.interventions.with_random_controls` with ``draws``)."""
    model, tok = models[regime].model, models[regime].tokenizer
    compare = compare or (lambda kk: comparison(trace, kk, kind=kind, scope=scope))
    ablation = ablation or (lambda st, m: ablate(st, m, "base", base_sd))

    def default_controls(what, kk, mdl, mask, make, sd):
        return with_random_controls(mdl, tok, facts, mask, make, draws=draws, seed=sd, splits=splits)

    controls = controls or default_controls
    rows = []
    for kk in ks:
        comp = compare(kk)
        shared = comp.shared
        abl = controls("ablation", kk, model, shared, lambda m: ablation(states[regime], m), seed)
        st = comp.stats()
        row = {
            "k": kk,
            "shared_fraction": st["shared_fraction"],
            "jaccard": st["jaccard"],
            "random_shared_fraction": random_overlap(st["storage_fraction"], st["query_fraction"])["shared_fraction"],
            "ablation_shared_drop": POINTS * (intact - abl["mask"][primary]),
            "ablation_random_drop_mean": POINTS * (intact - abl["random_mean"][primary]),
        }
        if recipient is not None:
            gr = controls("graft", kk, models[recipient].model, shared,
                          lambda m: graft(states[recipient], states[regime], m), seed + 100)  # fmt: skip
            row["graft_heldout"] = gr["mask"][primary]
            row["graft_random_heldout_mean"] = gr["random_mean"][primary]
        rows.append(row)
    return rows


def _graftable(a, b) -> str | None:
    """Why ``b``'s parameters cannot be grafted into ``a`` (names or shapes differ), or None."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys():
        return f"the checkpoints have different parameters (e.g. {sorted(set(pa) ^ set(pb))[0]!r})"
    bad = next((n for n in pa if pa[n].shape != pb[n].shape), None)
    return None if bad is None else f"{bad!r} has shape {tuple(pa[bad].shape)} vs {tuple(pb[bad].shape)}"


def _recall_splits(facts: FactSet, fmt: str = "query") -> tuple[FactSet, tuple[str, ...]]:
    """Facts for recall (those without a split as ``"unsplit"``; with ``fmt="storage"`` each fact's first storage
    text stands in for its query texts, scored without end-of-text) and the splits to measure, primary first."""
    if fmt not in ("query", "storage"):
        raise ValueError(f"recall format {fmt!r}: expected 'query' or 'storage'")
    if fmt == "storage":
        facts = FactSet([replace(f, query=f.storage[:1]) for f in facts], facts.source)
    if any(f.split is None for f in facts):
        facts = FactSet([f if f.split is not None else replace(f, split="unsplit") for f in facts], facts.source)
    present = facts.splits
    return facts, tuple(s for s in SPLITS if s in present) or (present[0],)


def run_facts(
    first: str,
    second: str,
    out: str | Path,
    facts,
    *,
    base: str | None = None,
    registry=None,
    k: float = 0.05,
    ks: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    draws: int = 5,
    sweep_draws: int = 2,
    scope: str = "per_matrix",
    consistency_facts: int = 64,
    seed: int = 0,
    split: str | None = None,
    count: int | None = None,
    labels: Sequence[str] | None = None,
    importance: str | None = None,
    device=None,
    dtype=None,
    batch_size: int = 4,
    layers: Sequence[int] | None = None,
    recall_format: str = "query",
) -> dict:
    """Shared-update masks of any two checkpoints on ``facts`` with post-hoc importance (module docstring).

    ``layers`` ranks only the block matrices of those layers (cheaper: gradients, rankings, random controls and
    interventions all shrink with it). ``recall_format="storage"`` measures recall on the facts' first storage texts
    instead of their query texts (query-format exact match includes end-of-text after the answer, which a chat model
    prompted without its template seldom predicts). The same checkpoint given twice is measured once (its entries are equal;
    grafting it into itself changes nothing)."""
    from mechrecall.report.consistency import check_labels, load_each, unique_labels, user_facts

    importance = importance or ("posthoc_x_update" if base else "posthoc")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance {importance!r}: expected one of {', '.join(IMPORTANCES)}")
    if importance != "posthoc" and base is None:
        raise ValueError(f"importance {importance!r} needs --base (the checkpoint before fine-tuning)")
    out = Path(out)
    fs = user_facts(facts, split, count)
    names = check_labels(labels, 2) or unique_labels([first, second])
    sources = (first, second, *([base] if base else []))
    cache = dict(zip(sources, load_each(sources, registry=registry, device=device, dtype=dtype)))  # twice: once
    models = {names[0]: cache[first], names[1]: cache[second]}
    for lm in models.values():
        check_tokenization(fs, lm.tokenizer, ("subject", "final"), lm.source)
    base_sd = state_of(cache[base].model) if base else None
    if base:
        for lm in models.values():
            why = _graftable(lm.model, cache[base].model)
            if why:
                raise CheckpointError(f"--base {base!r} does not match {lm.source!r}: {why}")
    states = {r: state_of(m.model) for r, m in models.items()}
    model_tok = {id(m.model): m.tokenizer for m in models.values()}
    recall_facts, splits = _recall_splits(fs, recall_format)
    primary = splits[0]
    storage_ex, query_ex = fs.examples("storage", templates=[0]), fs.examples("query", templates=[0])

    def include_for(model):
        wanted = None if layers is None else set(layers)
        return lambda n: block_matrices(n) and (wanted is None or arch.layer_of(n, model) in wanted)

    imp_cache: dict[str, dict] = {}

    def importances(lm: LoadedModel) -> dict:
        if lm.source not in imp_cache:
            include = include_for(lm.model)
            selected = {n: p for n, p in state_of(lm.model).items() if include(n)}
            if not selected:
                raise ValueError(f"--layers {list(layers)}: no attention / MLP weight matrix of {lm.source} is there")
            upd = update_importance({n: base_sd[n] for n in selected}, selected) if base else None
            per = {}
            for fmt, ex in (("storage", storage_ex), ("query", query_ex)):
                if importance == "update":
                    per[fmt] = upd
                    continue
                if layers is None:
                    g = posthoc_importance(lm.model, lm.tokenizer, ex, batch_size=batch_size)
                else:  # the same mean |per-example gradient|, for the selected matrices only
                    g = gradient_stats(lm.model, lm.tokenizer, ex, params=selected, batch_size=batch_size).mean_abs
                per[fmt] = {n: g[n].cpu() * (1 if upd is None else upd[n].cpu()) for n in selected}
            imp_cache[lm.source] = per
        return imp_cache[lm.source]

    mask_cache: dict[tuple, MaskComparison] = {}

    def compare_for(lm: LoadedModel):
        def compare(kk: float) -> MaskComparison:
            if (lm.source, kk) not in mask_cache:
                imp = importances(lm)
                include = include_for(lm.model)
                mask_cache[lm.source, kk] = MaskComparison(
                    topk_mask(imp["storage"], kk, scope=scope, include=include),
                    topk_mask(imp["query"], kk, scope=scope, include=include),
                    kk,
                )
            return mask_cache[lm.source, kk]

        return compare

    mode = "base" if base else "mean"
    control_cache: dict[tuple, dict] = {}

    def controls(what, kk, model, mask, make_state, sd, n_draws, donor=None):
        """with_random_controls, once per (what, model, k, draws, seed); grafting into the donor itself is a no-op."""
        key = (what, id(model), kk, n_draws, sd)
        if key not in control_cache:
            tok = model_tok[id(model)]
            if what == "graft" and donor is model:
                own = recall_under(model, tok, recall_facts, state_of(model), splits)
                control_cache[key] = {"mask": own, "random": {s: [own[s]] * n_draws for s in splits},
                                      "random_mean": dict(own), "random_std": dict.fromkeys(splits, 0.0),
                                      "n": mask_count(mask)}  # fmt: skip
            else:
                control_cache[key] = with_random_controls(
                    model, tok, recall_facts, mask, make_state, draws=n_draws, seed=sd, splits=splits
                )
        return control_cache[key]

    def ablation(state, mask):
        return ablate(state, mask, mode, base_sd)

    graft_block = _graftable(models[names[0]].model, models[names[1]].model)
    other = {names[0]: names[1], names[1]: names[0]}
    first_lm = models[names[0]]
    result: dict = {
        "k": k,
        "importance": importance,
        "importance_detail": {
            "posthoc": "mean |per-example answer-loss gradient| per format (mechrecall.masks.posthoc_importance)",
            "posthoc_x_update": "posthoc importance x |theta_ft - theta_base| (mechrecall.masks.update_importance)",
            "update": "|theta_ft - theta_base|, the same for both formats",
        }[importance],
        "scope": scope,
        "units": f"{primary} {'QA' if recall_format == 'query' else 'storage'} recall, percentage points",
        "recall_format": recall_format,
        "facts": fs.source,
        "n_facts": len(fs),
        "primary_split": primary,
        "splits": list(splits),
        "base": base,
        "labels": names,
        "device": str(model_device(first_lm.model)),
        "dtype": str(model_dtype(first_lm.model)).removeprefix("torch."),
    }
    if layers is not None:
        result["layers"] = sorted(set(layers))
    for regime, loaded in models.items():
        model, tok = loaded.model, loaded.tokenizer
        twin = next((r for r in result.get("labels", ()) if r in result and result[r]["source"] == loaded.source), None)
        if twin is not None:  # the same checkpoint again: the same numbers, grafting into itself is a no-op
            result[regime] = {**result[twin], "grafting": {**result[twin]["grafting"], "recipient": other[regime]},
                              "same_checkpoint_as": twin}  # fmt: skip
            continue
        compare = compare_for(loaded)
        comp = compare(k)
        shared = comp.shared
        with np.errstate(invalid="ignore"):  # layers outside --layers rank nothing: 0 / 0, written as null
            entry = {"source": loaded.source, **comp.stats(model.config)}
            loc = localize(shared, model.config)
            entry["heads_fraction"] = (loc["heads"] / loc["heads_total"]).tolist()
        intact = recall_under(model, tok, recall_facts, states[regime], splits)
        abl = controls("ablation", k, model, shared, lambda m, r=regime: ablation(states[r], m), seed, draws)
        only = {
            "storage_only": mask_minus(comp.storage, comp.query),
            "query_only": mask_minus(comp.query, comp.storage),
        }
        fmt_only = {
            name: recall_under(model, tok, recall_facts, ablation(states[regime], m), splits)
            for name, m in only.items()
        }
        entry["recall"] = intact
        entry["ablation"] = {
            "mode": mode,
            "shared_drop": _drop(intact, abl["mask"])[primary],
            "random_drop_mean": POINTS * (intact[primary] - abl["random_mean"][primary]),
            "random_drop_std": POINTS * abl["random_std"][primary],
            "random_drops": [POINTS * (intact[primary] - v) for v in abl["random"][primary]],
            "drops_per_split": _drop(intact, abl["mask"]),
            "format_only_drops": {name: _drop(intact, r) for name, r in fmt_only.items()},
            "format_only_counts": {name: mask_count(m) for name, m in only.items()},
            "n_masked": abl["n"],
        }
        recipient = other[regime] if graft_block is None else None
        if recipient is None:
            entry["grafting"] = {"recipient": other[regime], "skipped": graft_block}
        else:
            rmodel = models[recipient].model
            before = intact if rmodel is model else recall_under(rmodel, tok, recall_facts, states[recipient], splits)
            gr = controls("graft", k, rmodel, shared, lambda m, r=regime, t=recipient: graft(states[t], states[r], m),
                          seed + 100, draws, donor=model)  # fmt: skip
            entry["grafting"] = {
                "recipient": recipient,
                "heldout_before": before[primary],
                "heldout_after": gr["mask"][primary],
                "random_heldout_mean": gr["random_mean"][primary],
                "random_heldout_std": gr["random_std"][primary],
                "random_heldout": gr["random"][primary],
                "donor_heldout": intact[primary],
            }
        cons_s = fs.split(primary) if primary in fs.splits else fs
        pairs = (cons_s.examples("storage", templates=[0]), cons_s.examples("query", templates=[0]))
        entry["consistency"] = _consistency_split(loaded, pairs, shared, consistency_facts, chunk=batch_size)
        entry["sweep"] = _sweep(
            models, regime, recipient, None, states, base_sd, recall_facts, ks, None, scope, sweep_draws, seed,
            intact[primary], compare=compare, ablation=ablation, primary=primary, splits=splits,
            controls=lambda what, kk, mdl, mask, make, sd, m=model: controls(what, kk, mdl, mask, make, sd, sweep_draws, m),
        )  # fmt: skip
        result[regime] = entry
    result = finite(result)  # layers outside ``layers`` have no ranked parameters: 0 / 0
    atomic_write_files(out, {"masks.json": result, "masks.html": figures_html(result, first_lm.model.config)})
    return result


def figures(result: dict, config=None) -> list:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    regimes = [r for r in result.get("labels", ("two_stage", "mixed")) if r in result]
    size = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        size.add_trace(go.Scatter(x=[s["k"] for s in sw], y=[s["shared_fraction"] for s in sw], name=f"{r} shared"))
    sw = result[regimes[0]]["sweep"]
    size.add_trace(
        go.Scatter(x=[s["k"] for s in sw], y=[s["random_shared_fraction"] for s in sw], name="random expectation",
                   line={"dash": "dash"})
    )  # fmt: skip
    size.update_layout(title="Shared-update set size vs k", xaxis_title="k (top fraction per format)",
                       yaxis_title="shared fraction of block parameters", xaxis_type="log", yaxis_type="log")  # fmt: skip

    n_layers = len(result[regimes[0]]["per_layer_fraction"])
    heat = make_subplots(rows=1, cols=len(regimes), subplot_titles=[f"{r}: shared fraction per head" for r in regimes])
    for i, r in enumerate(regimes):
        heat.add_trace(
            go.Heatmap(z=result[r]["heads_fraction"], y=[f"L{L}" for L in range(n_layers)], coloraxis="coloraxis"),
            row=1, col=i + 1,
        )  # fmt: skip
    heat.update_layout(
        title=f"Where the shared set lies (k={result['k']}): attention heads", coloraxis={"colorscale": "Viridis"}
    )

    abl = go.Figure()
    for r in regimes:
        sw = result[r]["sweep"]
        abl.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["ablation_shared_drop"] for s in sw], name=f"{r}: shared")
        )
        abl.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["ablation_random_drop_mean"] for s in sw], name=f"{r}: random",
                       line={"dash": "dash"})
        )  # fmt: skip
    how = "reset to base" if result[regimes[0]]["ablation"]["mode"] == "base" else "set to the matrix mean"
    which = result.get("primary_split", "heldout").replace("heldout", "held-out")
    abl.update_layout(title=f"Ablation ({how}): {which} QA drop", xaxis_title="k", yaxis_title="drop (points)",
                      xaxis_type="log")  # fmt: skip

    gr = go.Figure()
    for r in regimes:
        if "skipped" in result[r]["grafting"]:
            continue
        sw = result[r]["sweep"]
        rec = result[r]["grafting"]["recipient"]
        gr.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["graft_heldout"] for s in sw], name=f"{r} shared -> {rec}")
        )
        gr.add_trace(
            go.Scatter(x=[s["k"] for s in sw], y=[s["graft_random_heldout_mean"] for s in sw],
                       name=f"random -> {rec}", line={"dash": "dash"})
        )  # fmt: skip
    gr.update_layout(
        title=f"Grafting: recipient's {which} QA", xaxis_title="k", yaxis_title=f"{which} QA", xaxis_type="log"
    )
    return [size, heat, abl, gr]


def figures_html(result: dict, config=None) -> str:
    from mechrecall.report.plotting import page

    return page(figures(result, config), "mechrecall masks")


def summary_rows(result: dict) -> list[str]:
    """Markdown rows for results.md."""
    lines = ["| regime | shared fraction | random expectation | Jaccard | ablation drop: shared | random (mean ± sd) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    regimes = list(result.get("labels", ("two_stage", "mixed")))
    for r in regimes:
        e = result[r]
        a = e["ablation"]
        lines.append(
            f"| {r} | {e['shared_fraction']:.4f} | {e['random_expectation']['shared_fraction']:.4f} | {e['jaccard']:.3f} "
            f"| {a['shared_drop']:.1f} | {a['random_drop_mean']:.1f} ± {a['random_drop_std']:.1f} |"
        )
    donor = regimes[-1]
    g = result[donor]["grafting"]
    lines.append("")
    if "skipped" in g:
        lines.append(f"Grafting skipped: {g['skipped']}")
        return lines
    lab = "primary_split" not in result  # a lab pair (its keys may be renamed regimes)
    into = g["recipient"].replace("_", "-") if lab else g["recipient"]
    which = "held-out QA" if lab else f"{result['primary_split']} {result.get('recall_format', 'query')} recall"
    lines.append(
        f"Grafting {donor}'s shared set into {into}: {which} {g['heldout_before']:.3f} -> {g['heldout_after']:.3f} "
        f"(random masks of the same size: {g['random_heldout_mean']:.3f} ± {g['random_heldout_std']:.3f}; "
        f"{donor} itself {g['donor_heldout']:.3f})"
    )
    return lines
