"""End to end on the micro preset: data, both regimes, evaluation, registry, results; and the CLI's errors."""

import json

import pytest

from mechrecall.__main__ import main
from mechrecall.registry import load_registry


def test_results_schema(micro_run):
    out, _ = micro_run
    r = json.loads((out / "results.json").read_text())
    assert r["preset"] == "micro" and r["seed"] == 0 and r["wall_seconds"] > 0
    for regime, keys in {
        "two_stage": ("heldout_qa", "trained_qa", "storage", "storage_after_stage1", "train_seconds"),
        "mixed": ("heldout_qa", "trained_qa", "storage", "train_seconds"),
    }.items():
        for k in keys:
            v = r["regimes"][regime][k]
            assert isinstance(v, float)
            if k != "train_seconds":
                assert 0.0 <= v <= 1.0
    assert "| two_stage |" in (out / "results.md").read_text()


def test_consistency_json_schema(micro_run):
    out, _ = micro_run
    c = json.loads((out / "consistency.json").read_text())
    for regime in ("two_stage", "mixed"):
        g, r = c["gradient"][regime], c["representation"][regime]
        assert -1 <= g["same_fact_mean_cos"] <= 1 and g["ci"][0] <= g["same_fact_mean_cos"] <= g["ci"][1]
        assert set(r["per_layer"]) == {"subject", "relation", "final"} and len(r["per_layer"]["final"]) == 2
        assert len(r["baseline_per_layer"]["subject"]) == 2 and isinstance(r["subject_last_layer_margin"], float)
    assert "plotly" in (out / "consistency.html").read_text()
    for regime in ("two_stage", "mixed"):  # load-time check of both hooked backends, recorded
        assert max(c["backend_parity"][regime].values()) <= 1e-4


def test_mixed_aligns_query_and_storage_more_than_two_stage(micro_run):
    """Findings 1 and 2 on the micro preset: larger same-fact gradient cosine and final-token state cosine."""
    out, _ = micro_run
    c = json.loads((out / "consistency.json").read_text())
    assert c["gradient"]["mixed"]["same_fact_mean_cos"] > c["gradient"]["two_stage"]["same_fact_mean_cos"]
    assert (
        c["representation"]["mixed"]["final_last_layer_margin"]
        > c["representation"]["two_stage"]["final_last_layer_margin"]
    )


def test_micro_preset_shows_the_direction_of_the_gap(micro_run):
    """Mixed training answers held-out QA better than two-stage training (the paper's headline), measured."""
    out, _ = micro_run
    r = json.loads((out / "results.json").read_text())["regimes"]
    assert r["mixed"]["trained_qa"] >= 0.9 and r["two_stage"]["trained_qa"] >= 0.9
    assert r["two_stage"]["storage_after_stage1"] >= 0.9
    assert r["mixed"]["heldout_qa"] > r["two_stage"]["heldout_qa"] + 0.1


def test_checkpoints_are_registered_and_evaluable(micro_run, capsys):
    out, reg = micro_run
    names = {e.name: e for e in load_registry(reg).checkpoints}
    assert {"micro-s0-base", "micro-s0-two-stage-stage1", "micro-s0-two-stage", "micro-s0-mixed"} <= names.keys()
    assert names["micro-s0-mixed"].regime == "mixed" and names["micro-s0-mixed"].dataset_hash
    assert main(["eval", "micro-s0-mixed", "--registry", str(reg)]) == 0
    printed = json.loads(capsys.readouterr().out)
    results = json.loads((out / "results.json").read_text())
    assert printed["heldout_qa"] == pytest.approx(results["regimes"]["mixed"]["heldout_qa"])


def test_finished_run_is_refused_without_force(micro_run, capsys):
    out, reg = micro_run
    before = (out / "results.json").read_text()
    assert main(["reproduce", "--preset", "micro", "--out", str(out), "--registry", str(reg)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "--preset", "nope"], "unknown preset 'nope'"),
        (["reproduce", "--preset", "micro", "--set", "mixed.bogus=1"], "unknown key 'bogus'"),
        (["eval", "no-such-checkpoint"], "neither an existing path nor a checkpoint name"),
        (["train", "--preset", "micro", "--regime", "sideways", "--out", "x"], "unknown regime 'sideways'"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")


def test_malformed_registry_is_reported_by_the_cli(tmp_path, capsys):
    reg = tmp_path / "checkpoints.yaml"
    reg.write_text("version: 1\ncheckpoints:\n- {name: x, regime: mixed}\n")
    assert main(["eval", "x", "--registry", str(reg)]) == 2
    err = capsys.readouterr().err
    assert str(reg) in err and "path" in err


def test_missing_checkpoint_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2  # exists, but is no checkpoint
    assert "config.json is missing" in capsys.readouterr().err


def test_consistency_trajectory_over_saved_checkpoints(micro_run):
    from mechrecall.report.consistency import trajectory

    out, _ = micro_run
    result = trajectory(out / "seed0", out / "traj", n_people=6, grad_facts=8)
    steps = {r: [p["global_step"] for p in pts] for r, pts in result["curves"].items()}
    assert steps["mixed"] == sorted(steps["mixed"]) and steps["mixed"][-1] == 500
    assert "stage1" in {p["stage"] for p in result["curves"]["two_stage"]}
    assert (out / "traj" / "consistency_trajectory.html").exists()


def test_masks_json_schema_and_finding_3_on_micro(micro_run):
    """Finding 3 on the micro preset: a larger shared set under mixed training, and ablating it hurts held-out QA
    more than size-matched random masks do (measured on a real run; schema of masks.json)."""
    out, _ = micro_run
    m = json.loads((out / "masks.json").read_text())
    assert 0 < m["k"] < 1
    for regime in ("two_stage", "mixed"):
        e = m[regime]
        assert 0 < e["shared_fraction"] <= m["k"] and 0 < e["jaccard"] < 1
        a = e["ablation"]
        assert len(a["random_drops"]) == 5 and a["random_drop_std"] >= 0
        assert {"heldout_before", "heldout_after", "random_heldout_mean"} <= set(e["grafting"])
    assert m["mixed"]["shared_fraction"] > m["two_stage"]["shared_fraction"]
    assert m["mixed"]["ablation"]["shared_drop"] > m["mixed"]["ablation"]["random_drop_mean"]
    assert "plotly" in (out / "masks.html").read_text()
    assert "Shared-update masks" in (out / "results.md").read_text()


def test_patching_and_attribution_json(micro_run):
    """Findings 4 and 5 on the micro preset: schema, and mixed's storage-format states drive held-out query answers
    more often than two-stage's when patched across formats."""
    out, _ = micro_run
    p = json.loads((out / "patching.json").read_text())
    hit = {r: max(max(row) for row in p["models"][r]["sites"]["resid_pre"]["metrics"]["hit"]["mean"])
           for r in ("two_stage", "mixed")}  # fmt: skip
    assert hit["mixed"] > hit["two_stage"]
    a = json.loads((out / "attribution.json").read_text())
    for r in ("two_stage", "mixed"):
        assert 0 <= a[r]["subject_plus_relation_share"] <= a[r]["subject_relation_preceding_share"] <= 1 and set(
            a[r]["per_role"]
        ) >= {"subject", "relation"}
        assert a[r]["ig_convergence"]["converged"]
    assert "Cross-format patching" in (out / "results.md").read_text()


def test_a_run_writes_its_facts_for_the_toolkit(micro_run):
    """The run's facts file (what the toolkit's command lines read beside a checkpoint, without the lab's code) holds
    the lab dataset's facts: the same texts, role spans, answers and splits."""
    from mechrecall.facts import checkpoint_facts
    from mechrecall.lab.models import lab_dataset
    from mechrecall.loading import load_model

    out, reg = micro_run
    loaded = load_model("micro-s0-mixed", registry=reg)
    ours, lab = checkpoint_facts(loaded.location, loaded.meta), lab_dataset(loaded).factset()

    def view(fs):
        texts = lambda exs: [(e.text, {r: s for r, s in e.spans.items() if s}) for e in exs]  # noqa: E731
        return [(f.id, f.subject, f.relation, f.answer, f.split, texts(f.storage), texts(f.query)) for f in fs]

    assert len(ours) == len(lab) > 0 and view(ours) == view(lab)


def test_patching_cli_on_registered_checkpoints(micro_run, tmp_path, capsys):
    import pandas as pd

    from mechrecall.patching.__main__ import main as patching_main

    _, reg = micro_run
    rc = patching_main(["--checkpoint", "micro-s0-mixed", "micro-s0-two-stage", "--registry", str(reg), "--count", "12",
                        "--sites", "resid_pre", "head", "--metric", "hit", "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 0
    df = pd.read_parquet(tmp_path / "p" / "patching.parquet")
    assert set(df["checkpoint"]) == {"micro-s0-mixed", "micro-s0-two-stage"}
    assert len(df) == 2 * (2 * 3 * 12 + 2 * 4 * 3 * 12)  # resid_pre: layer x role x example; head: x 4 heads
    assert "plotly" in (tmp_path / "p" / "patching.html").read_text()
    out = capsys.readouterr().out
    assert "micro-s0-mixed resid_pre: hit unpatched" in out and "best patch" in out and " at layer " in out
    result = json.loads((tmp_path / "p" / "patching.json").read_text())
    pairs = result["models"]["micro-s0-mixed"]["pairs"]
    assert len(pairs) == 12 and set(pairs[0]) == {"source_fact", "base_fact", "relation"}
    assert all(p["source_fact"] != p["base_fact"] and p["source_fact"].endswith("/" + p["relation"]) for p in pairs)
    rc = patching_main(["--checkpoint", "micro-s0-mixed", "--registry", str(reg), "--count", "5000", "--sites",
                        "resid_pre", "--metric", "hit", "--out", str(tmp_path / "q")])  # fmt: skip
    assert rc == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "--count 5000 asked for more than the" in line and "available" in line, line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "no-such-model"], "no-such-model"),
        (["--checkpoint", "micro-s0-mixed", "--granularity", "position"], "--corruption noise"),
        (["--checkpoint", "micro-s0-mixed", "--corruption", "noise", "--backend", "nnsight"], "backend hf"),
    ],
)
def test_patching_cli_errors(micro_run, tmp_path, capsys, argv, message):
    from mechrecall.patching.__main__ import main as patching_main

    _, reg = micro_run
    assert patching_main([*argv, "--registry", str(reg), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_reproduce_also_trains_and_tabulates_the_pre_instruction_regime(tmp_path):
    from mechrecall.report.reproduce import markdown_table, reproduce

    tiny = ["data.n_people=24", "two_stage.stage1.steps=4", "two_stage.stage2.steps=4", "mixed.steps=4",
            "pre_instruction.qa.steps=4", "pre_instruction.joint.steps=4", "save_every=100"]  # fmt: skip
    results = reproduce("micro", tmp_path / "out", overrides=tiny, registry=tmp_path / "reg.yaml", progress=False,
                        analyses=False, extra_regimes=["pre-instruction"])  # fmt: skip
    assert set(results["regimes"]) == {"two_stage", "mixed", "pre_instruction"}
    assert "micro-s0-pre-instruction" in results["per_seed"][0]["registered"]
    table = markdown_table(results)
    assert "| pre_instruction |" in table and "pre-instruction |" in table


def test_a_further_regime_gets_the_pair_analyses_against_two_stage(tmp_path, monkeypatch):
    """With analyses on, ``--also pre-instruction`` runs the same analyses on (two-stage, pre-instruction) into
    OUT/pre_instruction, its JSON keyed by the two regimes; the masks and patching analyses accept renamed lab
    labels (checked on the real checkpoints of the tiny run)."""
    import json

    from mechrecall.report import reproduce as rp
    from mechrecall.report.masks import run as masks_run
    from mechrecall.report.masks import summary_rows
    from mechrecall.report.patching import run_patching

    calls = []
    monkeypatch.setattr(rp, "run_analyses", lambda a, b, out, **kw: calls.append((a, b, out, kw)) or {"x": 0.0})
    monkeypatch.setattr("mechrecall.report.page.build", lambda out: None)
    tiny = ["data.n_people=24", "two_stage.stage1.steps=4", "two_stage.stage2.steps=4", "mixed.steps=4",
            "pre_instruction.qa.steps=4", "pre_instruction.joint.steps=4", "save_every=100"]  # fmt: skip
    out, reg = tmp_path / "out", tmp_path / "reg.yaml"
    rp.reproduce("micro", out, overrides=tiny, registry=reg, progress=False, extra_regimes=["pre-instruction"])
    (pair, third) = calls
    assert pair[:3] == ("micro-s0-two-stage", "micro-s0-mixed", out) and "labels" not in pair[3]
    assert third[:3] == ("micro-s0-two-stage", "micro-s0-pre-instruction", out / "pre_instruction")
    assert third[3]["labels"] == ("two_stage", "pre_instruction")
    assert "Two-stage against pre-instruction" in (out / "results.md").read_text()

    labels = ["two_stage", "pre_instruction"]
    m = masks_run("micro-s0-two-stage", "micro-s0-pre-instruction", tmp_path / "m", registry=reg, labels=labels,
                  draws=1, sweep_draws=1, ks=(0.05,), consistency_facts=4)  # fmt: skip
    assert m["labels"] == labels and {"two_stage", "pre_instruction"} <= set(m) and "mixed" not in m
    assert m["pre_instruction"]["grafting"]["recipient"] == "two_stage"
    assert any("pre_instruction's shared set into two-stage" in line for line in summary_rows(m))
    p = run_patching("micro-s0-two-stage", "micro-s0-pre-instruction", tmp_path / "p", registry=reg, labels=labels,
                     n_people=4, n_pairs=4)  # fmt: skip
    assert json.loads((tmp_path / "p" / "patching.json").read_text())["labels"] == labels
    assert list(p["models"]) == labels


def test_another_run_never_repoints_registered_names(micro_run, tmp_path, capsys):
    out, reg = micro_run
    before = reg.read_text()
    other = tmp_path / "other"
    rc = main(["reproduce", "--preset", "micro", "--out", str(other), "--registry", str(reg), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already point elsewhere" in err[0] and "'micro-s0-base'" in err[0] and "--force" in err[0]
    assert reg.read_text() == before and not other.exists()  # refused before any work
