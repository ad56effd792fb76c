"""``python -m mechrecall reproduce``: data, both regimes, evaluation, registry entries and a results table.

Per seed it writes ``OUT/seed<S>/`` (see :mod:`mechrecall.lab.train` for the layout), registers the checkpoints, and
finally ``OUT/results.json`` and ``OUT/results.md``. An interrupted run resumes where it stopped; a finished one is
refused unless ``force`` (which deletes it first).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mechrecall.checkpoint import read_meta
from mechrecall.io import atomic_write_json, atomic_write_text
from mechrecall.lab.bios import ATTRIBUTES
from mechrecall.lab.config import Preset, get_preset
from mechrecall.lab.train import train
from mechrecall.registry import Entry, register, relative_path

RESULT_KEYS = {
    "two_stage": ("heldout_qa", "trained_qa", "validation_qa", "storage", "storage_after_stage1", "train_seconds"),
    "mixed": ("heldout_qa", "trained_qa", "validation_qa", "storage", "train_seconds"),
    "pre_instruction": ("heldout_qa", "trained_qa", "validation_qa", "storage", "train_seconds"),
}


class RunExistsError(FileExistsError):
    pass


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("mechrecall", "torch", "transformers", "tokenizers", "transformer-lens", "nnsight"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _regime_summary(regime: str, meta: dict) -> dict:
    m = meta["metrics"]
    row = {k: m[k] for k in ("heldout_qa", "trained_qa", "validation_qa", "storage")}
    row["train_seconds"] = meta.get("train_seconds", float("nan"))
    row["steps"] = meta["global_step"]
    row["per_attribute"] = m["per_attribute"]
    if regime == "two_stage":
        stages = meta.get("stages") or {}
        s1 = stages.get("stage1") or {}
        row["storage_after_stage1"] = s1.get("storage", float("nan"))
        row["stage2_steps"] = (stages.get("stage2") or {}).get("steps")
        row["stage2_stopped_early"] = (stages.get("stage2") or {}).get("stopped_early")
    return row


def _seed_entries(preset: Preset, run_dir: Path, extra: Sequence[str] = ()) -> list[tuple[str, Path, str, str]]:
    """(registry name, folder, regime, stage) of every checkpoint a seed's run registers."""
    prefix = f"{preset.name}-s{preset.seed}"
    entries = [
        (f"{prefix}-base", run_dir / "data" / "base", "base", "init"),
        (f"{prefix}-two-stage-stage1", run_dir / "two_stage" / "stage1", "two_stage", "stage1"),
        (f"{prefix}-two-stage", run_dir / "two_stage" / "final", "two_stage", "final"),
        (f"{prefix}-mixed", run_dir / "mixed" / "final", "mixed", "final"),
    ]
    return entries + [(f"{prefix}-{r.replace('_', '-')}", run_dir / r / "final", r, "final") for r in extra]


def check_registry_names(entries: Sequence[tuple[str, Path, str, str]], registry: Path | None) -> None:
    """Refuse, before any work, names the registry already gives to checkpoints elsewhere: a run never repoints
    another run's names silently (``force`` does it on purpose; another ``--registry`` keeps both)."""
    from mechrecall.registry import default_path, load_registry

    reg_path = registry if registry is not None else default_path()
    reg = load_registry(reg_path)
    taken = []
    for name, folder, _, _ in entries:
        held = reg.get(name)
        if held is not None and (reg_path.resolve().parent / held.path).resolve() != folder.resolve():
            taken.append(f"{name!r} -> {held.path}")
    if taken:
        raise RunExistsError(
            f"{reg_path}: {len(taken)} name(s) this run registers already point elsewhere ({'; '.join(taken[:3])}"
            f"{'; ...' if len(taken) > 3 else ''}): pass --force to repoint them, or --registry another file"
        )


def _register_seed(preset: Preset, run_dir: Path, registry: Path | None, extra: Sequence[str] = ()) -> list[str]:
    names = []
    arch = preset.model.source or f"scratch:llama-L{preset.model.n_layers}-d{preset.model.d_model}"
    prefix = f"{preset.name}-s{preset.seed}"
    for name, folder, regime, stage in _seed_entries(preset, run_dir, extra):
        meta = read_meta(folder)
        metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))}
        entry = Entry(
            name=name,
            path=relative_path(folder, registry),
            base_model=arch if regime == "base" else f"{prefix}-base",
            regime=regime,
            stage=stage,
            seed=preset.seed,
            dataset_hash=meta.get("dataset_hash"),
            metrics=metrics,
        )
        register(entry, registry)
        names.append(name)
    return names


def _spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def markdown_table(results: dict) -> str:
    lines = [
        f"# mechrecall reproduce: preset `{results['preset']}`, seeds {results['seeds']}",
        "",
        "Exact-match recall (fractions; greedy = teacher-forced argmax on every answer token, plus end-of-text for QA).",
        "",
        "| regime | held-out QA | trained QA | validation QA | storage (end) | storage after stage 1 | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    multi = len(results["seeds"]) > 1

    def cell(r: dict, sp: dict, k: str) -> str:
        if k not in r:
            return "–"
        if k in sp and multi:
            digits = 0 if k == "train_seconds" else 3
            return f"{sp[k]['mean']:.{digits}f} ± {sp[k]['std']:.{digits}f}"
        return f"{r[k]:.3f}" if k != "train_seconds" else f"{r[k]:.0f}"

    for regime in results["regimes"]:
        r, sp = results["regimes"][regime], results.get("spread", {}).get(regime, {})
        cells = [
            cell(r, sp, k)
            for k in ("heldout_qa", "trained_qa", "validation_qa", "storage", "storage_after_stage1", "train_seconds")
        ]
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    first = results["per_seed"][0]["regimes"]
    header = " | ".join(r.replace("_", "-") for r in first)
    lines += ["", "Held-out QA per attribute (first seed):", "", f"| attribute | {header} |",
              "|---|" + "---|" * len(first)]  # fmt: skip
    for a in ATTRIBUTES:
        cells = " | ".join(f"{first[r]['per_attribute']['heldout_qa'][a]:.3f}" for r in first)
        lines.append(f"| {a} | {cells} |")
    lines += [
        "",
        f"Gap (mixed − two-stage held-out QA): {results['gap']['mean']:.3f}",
        f"Wall time: {results['wall_seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines)


def analyses_markdown(out: Path) -> str:
    """The analyses' summary tables for results.md (those whose JSON exists in ``out``)."""
    lines: list[str] = []
    if (out / "masks.json").exists():
        from mechrecall.report.masks import summary_rows

        masks = json.loads((out / "masks.json").read_text())
        lines += [
            "",
            f"## Shared-update masks (k = {masks['k']}, held-out QA drops in points)",
            "",
            *summary_rows(masks),
        ]
    if (out / "patching.json").exists() or (out / "attribution.json").exists():
        from mechrecall.report.patching import summary_rows as patch_rows

        def load(name):
            return json.loads((out / name).read_text()) if (out / name).exists() else None

        lines += ["", "## Cross-format patching (storage of A -> query of B, held-out) and token-role attribution", ""]
        lines += patch_rows(load("patching.json"), load("attribution.json"))
    return "\n".join(lines) + ("\n" if lines else "")


# Analysis sizes for a pretrained base (a 100M+ model on a CPU): fewer facts, pairs and random draws than the lab's
# defaults, which are sized for the 2-layer model. Each value is recorded in the analysis' own JSON.
PRETRAINED_SIZES: dict[str, dict] = {
    "consistency": {"n_people": 40, "grad_facts": 48},
    "masks": {"count": 120, "consistency_facts": 24, "draws": 3, "sweep_draws": 1, "ks": (0.01, 0.05, 0.2)},
    "patching": {"n_people": 20, "n_pairs": 40},
    # IG on SmolLM2's biography prefixes: about 6 s a quadrature step for 24 prompts on 2 CPU cores, and prompts that
    # need 128 steps (16 + 32 + 64 + 128 computed) are common, so 10 people at up to 256 steps ran for hours
    "attribution": {"n_people": 4, "max_steps": 128},
}


def run_analyses(
    two_stage: str,
    mixed: str,
    out: Path,
    *,
    registry: str | Path | None = None,
    preset: Preset | None = None,
    base: str | None = None,
    labels: Sequence[str] = ("two_stage", "mixed"),
) -> dict[str, float]:
    """Every analysis on one checkpoint pair (seed 0), each writing its JSON and figures into ``out``; seconds each.

    With ``preset`` trained without a gradient trace (``trace=false``), the masks take post-hoc importance on the
    run's own facts instead (``posthoc_x_update`` against ``base``, the run's starting checkpoint: what any two
    checkpoints get, see :mod:`mechrecall.report.masks`); a pretrained-base preset uses :data:`PRETRAINED_SIZES`.
    ``labels`` name the pair in every JSON (e.g. ``two_stage`` / ``pre_instruction`` for a third regime).
    """
    from mechrecall.report.consistency import run as consistency_run
    from mechrecall.report.masks import run as masks_run
    from mechrecall.report.patching import run_attribution, run_patching

    sizes = PRETRAINED_SIZES if preset is not None and preset.model.source is not None else {}
    masks_kw = dict(sizes.get("masks", {}))
    if preset is not None and not preset.trace:
        from mechrecall.lab.bios import generate

        masks_kw.update(facts=generate(preset.data.spec(), preset.seed).factset(), split="heldout", base=base)
    steps = {
        "consistency": lambda: consistency_run(
            [two_stage, mixed], out, registry=registry, labels=labels, **sizes.get("consistency", {})
        ),
        "masks": lambda: masks_run(two_stage, mixed, out, registry=registry, labels=labels, **masks_kw),
        "patching": lambda: run_patching(
            two_stage, mixed, out, registry=registry, labels=labels, **sizes.get("patching", {})
        ),
        "attribution": lambda: run_attribution(
            two_stage, mixed, out, registry=registry, labels=labels, **sizes.get("attribution", {})
        ),
    }
    seconds = {}
    for name, step in steps.items():
        t = time.perf_counter()
        step()
        seconds[name] = time.perf_counter() - t
    return seconds


def reproduce(
    preset_name: str = "default",
    out: str | Path = "runs/default",
    *,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    force: bool = False,
    registry: str | Path | None = None,
    progress: bool = True,
    analyses: bool = True,
    training: dict | None = None,
    extra_regimes: Sequence[str] = (),
) -> dict:
    """Run the whole pipeline and return the results dict that is also written to ``out/results.json``.

    ``training`` holds :func:`mechrecall.lab.train.train`'s device options (``device``, ``autocast``,
    ``gradient_checkpointing``); the analyses then read the checkpoints on the CPU. ``extra_regimes`` (e.g.
    ``["pre_instruction"]``) are trained and tabulated after the two regimes, and each gets the pair's analyses
    against two-stage in ``out/<regime>``."""
    from mechrecall.lab.train import normalize_regime

    extra_regimes = [normalize_regime(r) for r in extra_regimes if normalize_regime(r) not in ("two_stage", "mixed")]
    out = Path(out)
    if (out / "results.json").exists():
        if not force:
            raise RunExistsError(f"{out} already holds a finished run (results.json); pass --force to redo it")
        shutil.rmtree(out)
    if not seeds:
        raise ValueError("need at least one seed")
    presets = {s: get_preset(preset_name, [*overrides, f"seed={s}"]) for s in seeds}  # validate all before work
    if not force:
        entries = [e for s, p in presets.items() for e in _seed_entries(p, out / f"seed{s}", extra_regimes)]
        check_registry_names(entries, Path(registry) if registry else None)
    t0 = time.perf_counter()
    per_seed = []
    for seed, preset in presets.items():
        run_dir = out / f"seed{seed}"
        regimes = {}
        for regime in ("two_stage", "mixed", *extra_regimes):
            meta = train(preset, regime, run_dir, progress=progress, **(training or {}))
            if "stages" not in meta:  # finished earlier: stage metrics live in the stage checkpoints
                stage1 = read_meta(run_dir / "two_stage" / "stage1") if regime == "two_stage" else None
                meta["stages"] = {"stage1": stage1["metrics"]} if stage1 else {}
            regimes[regime] = _regime_summary(regime, meta)
        names = _register_seed(preset, run_dir, Path(registry) if registry else None, extra_regimes)
        per_seed.append({"seed": seed, "run_dir": str(run_dir), "regimes": regimes, "registered": names})

    keys = {r: RESULT_KEYS[r] for r in ("two_stage", "mixed", *extra_regimes)}
    mean_regimes = {
        regime: {k: statistics.fmean(ps["regimes"][regime][k] for ps in per_seed) for k in keys[regime]}
        for regime in keys
    }
    spread = {
        regime: {k: _spread([ps["regimes"][regime][k] for ps in per_seed]) for k in keys[regime]} for regime in keys
    }
    gaps = [ps["regimes"]["mixed"]["heldout_qa"] - ps["regimes"]["two_stage"]["heldout_qa"] for ps in per_seed]
    results = {
        "preset": preset_name,
        "seed": seeds[0],
        "seeds": list(seeds),
        "regimes": mean_regimes,
        "spread": spread,
        "gap": _spread(gaps),
        "per_seed": per_seed,
        "wall_seconds": time.perf_counter() - t0,
        "provenance": {
            "config": presets[seeds[0]].model_dump(mode="json"),
            "overrides": list(overrides),
            "versions": _versions(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    if analyses:
        first = per_seed[0]
        two_stage = next(n for n in first["registered"] if n.endswith("-two-stage"))
        mixed = next(n for n in first["registered"] if n.endswith("-mixed"))
        base = next(n for n in first["registered"] if n.endswith("-base"))
        results["analysis_seconds"] = run_analyses(
            two_stage, mixed, out, registry=registry, preset=presets[seeds[0]], base=base
        )
        # a further regime gets the same analyses against two-stage, in its own folder (keys: the two regimes)
        for regime in extra_regimes:
            name = next((n for n in first["registered"] if n.endswith("-" + regime.replace("_", "-"))), None)
            if name is None:
                raise ValueError(f"regime {regime!r} was trained but not registered: cannot analyse it")
            results.setdefault("extra_analysis_seconds", {})[regime] = run_analyses(
                two_stage, name, out / regime, registry=registry, preset=presets[seeds[0]], base=base,
                labels=("two_stage", regime),
            )  # fmt: skip
        results["wall_seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    extra_md = "".join(
        f"\n## Two-stage against {r.replace('_', '-')} (the same analyses; {out / r})\n" + analyses_markdown(out / r)
        for r in extra_regimes
        if analyses
    )
    atomic_write_text(out / "results.md", markdown_table(results) + analyses_markdown(out) + extra_md)
    if analyses:
        from mechrecall.report.page import build

        build(out)
    return results
