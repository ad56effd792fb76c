"""``python -m mechrecall reproduce``: data, both regimes, evaluation, registry entries and a results table.

Per seed it writes ``OUT/seed<S>/`` (see :mod:`mechrecall.lab.train` for the layout), registers the checkpoints, and
finally ``OUT/results.json`` and ``OUT/results.md``. An interrupted run resumes where it stopped; a finished one is
refused unless ``force`` (which deletes it first).
"""

from __future__ import annotations

import importlib.metadata
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
    """The summary tables of every registered analysis whose JSON is in ``out``, for results.md."""
    from mechrecall.report.analysis import analyses

    lines: list[str] = []
    for analysis in analyses():
        result = None if analysis.summary is None or analysis.beside else analysis.load(out)
        if result is not None:
            title = analysis.title(result) if analysis.title is not None else analysis.name
            lines += ["", f"## {title}", "", *analysis.summary(result)]
    return "\n".join(lines) + ("\n" if lines else "")


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
    """Every registered analysis on one checkpoint pair (seed 0), each writing its JSON and figures into ``out``;
    seconds each.

    ``preset`` and ``base`` (the run's starting checkpoint) go to each analysis (:class:`~mechrecall.report.analysis.
    PairContext`): a pretrained base gets each analysis' smaller ``pretrained_sizes``, and a preset trained without a
    gradient trace (``trace=false``) gets post-hoc mask importance against ``base``. ``labels`` name the pair in
    every JSON (e.g. ``two_stage`` / ``pre_instruction`` for a third regime).
    """
    from mechrecall.report.analysis import PairContext, analyses

    pretrained = preset is not None and preset.model.source is not None
    context = PairContext(preset=preset, base=base, pretrained=pretrained)
    seconds = {}
    for analysis in analyses():
        if analysis.run_pair is not None:
            t = time.perf_counter()
            analysis.run_pair(two_stage, mixed, out, registry=registry, labels=list(labels), context=context)
            seconds[analysis.name] = time.perf_counter() - t
    return seconds


def _train_seed(preset: Preset, run_dir: Path, regimes: Sequence[str], registry: Path | None, progress: bool,
                training: dict | None) -> dict:  # fmt: skip
    """Train every regime of one seed (a finished one is read back), register the checkpoints; the seed's entry."""

    summaries = {}
    for regime in regimes:
        meta = train(preset, regime, run_dir, progress=progress, **(training or {}))
        if "stages" not in meta:  # finished earlier: stage metrics live in the stage checkpoints
            stage1 = read_meta(run_dir / "two_stage" / "stage1") if regime == "two_stage" else None
            meta["stages"] = {"stage1": stage1["metrics"]} if stage1 else {}
        summaries[regime] = _regime_summary(regime, meta)
    names = _register_seed(preset, run_dir, registry, [r for r in regimes if r not in ("two_stage", "mixed")])
    return {"seed": preset.seed, "run_dir": str(run_dir), "regimes": summaries, "registered": names}


def _tabulate(preset_name: str, presets: dict, per_seed: list[dict], overrides: Sequence[str]) -> dict:
    """Means and spreads over seeds of every regime's numbers, the gap, and the provenance."""
    regimes = per_seed[0]["regimes"]
    keys = {r: RESULT_KEYS[r] for r in regimes}
    seeds = list(presets)
    gaps = [ps["regimes"]["mixed"]["heldout_qa"] - ps["regimes"]["two_stage"]["heldout_qa"] for ps in per_seed]
    return {
        "preset": preset_name,
        "seed": seeds[0],
        "seeds": seeds,
        "regimes": {r: {k: statistics.fmean(ps["regimes"][r][k] for ps in per_seed) for k in keys[r]} for r in keys},
        "spread": {r: {k: _spread([ps["regimes"][r][k] for ps in per_seed]) for k in keys[r]} for r in keys},
        "gap": _spread(gaps),
        "per_seed": per_seed,
        "provenance": {
            "config": presets[seeds[0]].model_dump(mode="json"),
            "overrides": list(overrides),
            "versions": _versions(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }


def _analyse_all(first: dict, out: Path, preset: Preset, registry, extra_regimes: Sequence[str]) -> dict:
    """The analyses of the first seed's pair into ``out``, and of each further regime against two-stage into
    ``out/<regime>``; seconds of each."""
    two_stage = next(n for n in first["registered"] if n.endswith("-two-stage"))
    mixed = next(n for n in first["registered"] if n.endswith("-mixed"))
    base = next(n for n in first["registered"] if n.endswith("-base"))
    seconds = {"analysis_seconds": run_analyses(two_stage, mixed, out, registry=registry, preset=preset, base=base)}
    for regime in extra_regimes:  # the same analyses against two-stage, in its own folder (keys: the two regimes)
        name = next((n for n in first["registered"] if n.endswith("-" + regime.replace("_", "-"))), None)
        if name is None:
            raise ValueError(f"regime {regime!r} was trained but not registered: cannot analyse it")
        seconds.setdefault("extra_analysis_seconds", {})[regime] = run_analyses(
            two_stage, name, out / regime, registry=registry, preset=preset, base=base, labels=("two_stage", regime)
        )
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
    out, reg = Path(out), (Path(registry) if registry else None)
    if (out / "results.json").exists():
        if not force:
            raise RunExistsError(f"{out} already holds a finished run (results.json); pass --force to redo it")
        shutil.rmtree(out)
    if not seeds:
        raise ValueError("need at least one seed")
    presets = {s: get_preset(preset_name, [*overrides, f"seed={s}"]) for s in seeds}  # validate all before work
    if not force:
        check_registry_names([e for s, p in presets.items() for e in _seed_entries(p, out / f"seed{s}", extra_regimes)],
                             reg)  # fmt: skip
    t0 = time.perf_counter()
    regimes = ("two_stage", "mixed", *extra_regimes)
    per_seed = [_train_seed(p, out / f"seed{s}", regimes, reg, progress, training) for s, p in presets.items()]
    results = _tabulate(preset_name, presets, per_seed, overrides)
    results["wall_seconds"] = time.perf_counter() - t0
    if analyses:
        results |= _analyse_all(per_seed[0], out, presets[seeds[0]], registry, extra_regimes)
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
