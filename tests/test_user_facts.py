"""Any model, any device, anyone's facts: the CLIs on SmolLM2-135M with tests/data/facts.jsonl, and their bad input.

End to end: ``python -m mechrecall.patching`` and the consistency / masks / attribution / patching analyses run on
SmolLM2-135M-Instruct (a pretrained BPE model, not a lab run) with the hand-written fact file and write their JSON and
figures; kept cheap (a few facts, one or two layers, few IG steps) for the suite's CPU budget. Bad input (unknown
architecture, a record whose role cannot be found, a dtype the device cannot run, ``--device cuda`` without a GPU)
ends with one ``error:`` line naming the culprit, exit status 2, and nothing written to ``--out``.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mechrecall.facts import load_facts

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "tests" / "data" / "facts.jsonl"
SMOL = "smollm2-135m-instruct"


def script(name: str):
    """An analysis script as a module (its ``main(argv)``), imported in-process (analyses/ on the path)."""
    if str(ROOT / "analyses") not in sys.path:
        sys.path.insert(0, str(ROOT / "analyses"))
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ROOT / "analyses" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def patching_main(argv):
    from mechrecall.patching.__main__ import main

    return main(argv)


@pytest.fixture(scope="module")
def smollm2():
    """Loads (and on a fresh machine fetches and dequantises) SmolLM2 once, so the CLIs below find it cached."""
    from mechrecall.loading import load_model

    return load_model(SMOL, registry=ROOT / "checkpoints.yaml")


def plotly_page(path: Path) -> bool:
    return path.stat().st_size > 0 and "plotly" in path.read_text()


# ---------------------------------------------------------------------------------------------------- end to end
def test_patching_cli_on_smollm2_with_the_fact_file(smollm2, tmp_path):
    out = tmp_path / "p"
    rc = patching_main(["--model", SMOL, "--facts", str(FACTS), "--count", "6", "--layers", "0", "29",
                        "--sites", "resid_pre", "mlp_out", "--metric", "hit", "--device", "cpu", "--out", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "patching.json").read_text())
    m = result["models"][SMOL]
    assert m["n"] == 6 and m["roles"] == ["subject", "relation", "final"]
    assert m["sites"]["resid_pre"]["labels"]["layer"] == [0, 29] and result["schema"] == "mechrecall.patching/2"
    assert result["facts"]["n_facts"] == 32 and result["settings"]["dtype"] == "float32"
    df = pd.read_parquet(out / "patching.parquet")
    assert len(df) == 2 * 2 * 3 * 6  # sites x layers x roles x pairs
    assert plotly_page(out / "patching.html")


def test_patching_cli_same_fact_mode_on_one_split(smollm2, tmp_path, capsys):
    """--split with --facts; the old spelling --facts SPLIT on a model that is not a lab run is refused in one line."""
    out = tmp_path / "same"
    rc = patching_main(["--checkpoint", SMOL, "--facts", str(FACTS), "--split", "heldout", "--mode", "same_fact",
                        "--count", "4", "--layers", "15", "--out", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "patching.json").read_text())
    assert result["models"][SMOL]["n"] == 4
    # with --facts the default metric scores the whole (multi-token) answer: a log-probability, <= 0
    site = result["models"][SMOL]["sites"]["resid_pre"]["metrics"]["answer_logprob"]
    assert result["settings"]["metric"] == ["answer_logprob"] and site["base_mean"] <= 0 and site["source_mean"] <= 0
    fails_cleanly(capsys, lambda extra, o: patching_main(["--model", SMOL, "--facts", "heldout", "--out", o]), [],
                  tmp_path / "lab", "no facts file beside this checkpoint", "pass --facts FILE")  # fmt: skip


def test_consistency_analysis_on_smollm2(smollm2, tmp_path, capsys):
    rc = script("consistency")(["--checkpoints", SMOL, "--facts", str(FACTS), "--count", "4", "--grad-facts", "2",
                                "--no-parity", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    c = json.loads((tmp_path / "consistency.json").read_text())
    assert c["facts"] == str(FACTS) and c["n_facts"] == 4 and c["labels"] == [SMOL]
    g, r = c["gradient"][SMOL], c["representation"][SMOL]
    assert -1 <= g["same_fact_mean_cos"] <= 1 and g["n_facts"] == 2
    assert set(r["per_layer"]) == {"subject", "relation", "final"} and len(r["per_layer"]["final"]) == 30
    assert plotly_page(tmp_path / "consistency.html")


@pytest.mark.parametrize("name", ["consistency", "masks"])
def test_a_model_too_large_for_free_memory_gets_one_line_and_no_output(smollm2, tmp_path, capsys, monkeypatch, name):
    """The gradient measures' memory estimate is checked before any gradient: exit 2, one line naming what it needs,
    nothing written to --out."""
    import mechrecall.devices as devices_mod

    monkeypatch.setattr(devices_mod, "available_memory", lambda device: 1 << 30)  # 1 GiB free: SmolLM2 needs more
    out = tmp_path / "out"
    models = [SMOL] if name == "consistency" else [SMOL, SMOL]
    extra = ["--grad-facts", "2", "--no-parity"] if name == "consistency" else ["--draws", "1", "--ks", "0.05"]
    rc = script(name)(["--checkpoints", *models, "--facts", str(FACTS), "--count", "4", *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "needs about" in err and "GiB are free" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_masks_analysis_on_smollm2_with_posthoc_importance(smollm2, tmp_path, capsys):
    rc = script("masks")(["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), "--split", "heldout", "--count", "4",
                          "--k", "0.05", "--ks", "0.05", "--draws", "1", "--consistency-facts", "2", "--layers", "29",
                          "--recall-format", "storage", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "masks.json").read_text())
    assert m["importance"] == "posthoc" and m["primary_split"] == "heldout" and m["recall_format"] == "storage"
    assert m["labels"] == [SMOL, f"{SMOL}#2"] and m["layers"] == [29]
    a = m[SMOL]
    assert a["ablation"]["mode"] == "mean" and 0 < a["shared_fraction"] < 0.05 and a["n_ranked"] > 0
    assert a["per_layer_fraction"][0] is None and a["per_layer_fraction"][29] > 0  # only layer 29 is ranked
    assert 0 <= a["recall"]["heldout"] <= 1 and len(a["sweep"]) == 1
    assert m[f"{SMOL}#2"]["same_checkpoint_as"] == SMOL
    assert plotly_page(tmp_path / "masks.html")


def test_attribution_and_patching_analyses_on_smollm2(smollm2, tmp_path, capsys):
    rc = script("attribution")(["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), "--count", "2", "--steps", "2",
                                "--max-steps", "2", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    a = json.loads((tmp_path / "attribution.json").read_text())
    assert a["labels"] == [SMOL, f"{SMOL}#2"] and a[SMOL]["n"] == 2 and a[SMOL]["ig_convergence"]["steps"] == 2
    assert 0 <= a[SMOL]["subject_plus_relation_share"] <= a[SMOL]["subject_relation_preceding_share"] <= 1 and set(
        a[SMOL]["per_role"]
    ) >= {"subject", "relation"}
    assert plotly_page(tmp_path / "attribution.html")
    rc = script("patching")(["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), "--count", "3", "--sites",
                             "resid_pre", "--layers", "29", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    p = json.loads((tmp_path / "patching.json").read_text())
    assert p["schema"] == "mechrecall.patching/2"  # the patching command line's schema too
    assert p["labels"] == [SMOL, f"{SMOL}#2"] and p["models"][SMOL]["n"] == 3
    whole = p["models"][SMOL]["sites"]["resid_pre"]
    assert whole["labels"]["layer"] == [29] and set(whole["metrics"]) == {"logit_diff", "hit", "answer_logprob",
                                                                          "answer_match"}  # fmt: skip
    assert whole["metrics"]["answer_logprob"]["base_mean"] <= 0 <= whole["metrics"]["answer_match"]["base_mean"] <= 1
    assert p["models"][SMOL]["noise_tracing_resid_pre"]["layers"] == [29]
    assert plotly_page(tmp_path / "patching.html")


def test_eval_cli_scores_a_fact_file_on_any_checkpoint(smollm2, capsys):
    from mechrecall.__main__ import main

    reg = str(ROOT / "checkpoints.yaml")
    assert (
        main(["eval", SMOL, "--registry", reg, "--facts", str(FACTS), "--split", "validation", "--device", "cpu"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["n_facts"] == 5 and 0 <= r["storage"] <= 1 and 0 <= r["query"] <= 1
    assert set(r["query_per_split"]) == {"validation"}
    assert main(["eval", SMOL, "--registry", reg, "--facts", str(FACTS), "--split", "nope"]) == 2
    assert "no fact has split 'nope'" in capsys.readouterr().err
    # an instruct model in its chat template, scored by the answer in its reply (plumbing; the numbers are in the docs)
    argv = ["eval", SMOL, "--registry", reg, "--facts", str(FACTS), "--split", "validation", "--chat-template",
            "--match", "in-reply", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["match"] == "in-reply" and 0 <= r["query_per_split"]["validation"] <= 1


def test_recall_analysis_on_smollm2(smollm2, tmp_path, capsys):
    rc = script("recall_gap")(["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), "--split", "validation",
                               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "recall.json").read_text())
    assert r["n_facts"] == 5 and set(r[SMOL]["storage_per_relation"]) == set(load_facts(FACTS).relations)
    assert 0 <= r[SMOL]["query"]["validation"] <= 1 and r[SMOL]["storage"] == r[f"{SMOL}#2"]["storage"]
    assert plotly_page(tmp_path / "recall.html")


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def unsupported_folder(tmp_path_factory, micro_tokenizer):
    """A tiny OPT causal LM: a real Hugging Face architecture that mechrecall.arch has no row for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("opt", vocab_size=len(micro_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64)  # fmt: skip
    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    micro_tokenizer.save_pretrained(path)
    return path


def bad_fact_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    good = FACTS.read_text().splitlines()[:3]
    bad = {"id": "nobody", "subject": "Marie Curie", "relation": "birth_city", "answer": "Warsaw",
           "storage": ["Marie Curie was born in Warsaw"], "query": ["Where was she born?\nAnswer: Warsaw"]}  # fmt: skip
    path.write_text("\n".join([*good, json.dumps(bad)]) + "\n")
    return path


def no_relation_file(tmp_path: Path) -> Path:
    """Valid records without relation_text: consistency needs a relation role in every text."""
    path = tmp_path / "norel.jsonl"
    rows = [json.loads(line) for line in FACTS.read_text().splitlines()[7:10]]
    for r in rows:
        r.pop("relation_text")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CLIS = {
    "patching": lambda extra, out: patching_main(["--model", SMOL, "--facts", str(FACTS), *extra, "--out", out]),
    "consistency": lambda extra, out: script("consistency")(
        ["--checkpoints", SMOL, "--facts", str(FACTS), *extra, "--out", out]
    ),  # fmt: skip
    "masks": lambda extra, out: script("masks")(
        ["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), *extra, "--out", out]
    ),  # fmt: skip
    "attribution": lambda extra, out: script("attribution")(
        ["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), *extra, "--out", out]
    ),  # fmt: skip
    "analyses/patching": lambda extra, out: script("patching")(
        ["--checkpoints", SMOL, SMOL, "--facts", str(FACTS), *extra, "--out", out]
    ),  # fmt: skip
}


def fails_cleanly(capsys, run, extra, out: Path, *names: str) -> str:
    """``run`` exits 2 with one ``error:`` line naming every one of ``names``, and leaves ``out`` as it was."""
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert run(extra, str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    for name in names:
        assert name in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("cli", list(CLIS))
def test_device_cuda_without_a_gpu(cli, tmp_path, capsys):
    fails_cleanly(capsys, CLIS[cli], ["--device", "cuda"], tmp_path / "out", "--device 'cuda'", "no CUDA GPU")


@pytest.mark.parametrize("cli", list(CLIS))
def test_unknown_dtype(cli, tmp_path, capsys):
    fails_cleanly(capsys, CLIS[cli], ["--dtype", "float8"], tmp_path / "out", "--dtype 'float8'", "unknown")


def test_a_dtype_the_gpu_cannot_run(monkeypatch, tmp_path, capsys):
    """bfloat16 on a GPU without it (simulated: this machine may have none), the out folder untouched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    for cli in CLIS.values():
        fails_cleanly(capsys, cli, ["--device", "cuda", "--dtype", "bf16"], out, "--dtype 'bf16'", "bfloat16")
    assert (out / "keep.txt").read_text() == "earlier results"


@pytest.mark.parametrize("cli", list(CLIS))
def test_a_record_whose_subject_cannot_be_found(cli, tmp_path, capsys):
    bad = bad_fact_file(tmp_path)
    run = CLIS[cli]

    def with_bad_facts(extra, out):
        return run([*extra, "--facts", str(bad)], out)

    fails_cleanly(capsys, with_bad_facts, [], tmp_path / "out", str(bad), "line 4", "'nobody'", "query[0]",
                  "field 'subject'")  # fmt: skip


def test_a_role_that_lands_on_no_token(smollm2, tmp_path, capsys):
    """Consistency caches the relation role: facts without relation_text fail before any model work, naming one."""
    path = no_relation_file(tmp_path)

    def run(extra, out):
        return script("consistency")(["--checkpoints", SMOL, "--facts", str(path), "--out", out])

    fails_cleanly(capsys, run, [], tmp_path / "out", "fact 'capital-1'", "storage[0]", SMOL, "role 'relation'")


@pytest.mark.parametrize("cli", ["patching", "masks", "attribution"])
def test_an_unknown_architecture(cli, unsupported_folder, tmp_path, capsys):
    folder = str(unsupported_folder)
    runs = {
        "patching": lambda out: patching_main(["--model", folder, "--facts", str(FACTS), "--out", out]),
        "masks": lambda out: script("masks")(["--checkpoints", folder, folder, "--facts", str(FACTS), "--out", out]),
        "attribution": lambda out: script("attribution")(
            ["--checkpoints", folder, folder, "--facts", str(FACTS), "--out", out]
        ),  # fmt: skip
    }
    fails_cleanly(capsys, lambda extra, out: runs[cli](out), [], tmp_path / "out", folder, "'opt'", "not supported")


def test_errors_through_a_real_process(tmp_path):
    """The same contract seen from outside: exit status 2, one stderr line, no output folder."""
    out = tmp_path / "out"
    bad = bad_fact_file(tmp_path)
    for cmd in (
        [sys.executable, "-m", "mechrecall.patching", "--model", SMOL, "--facts", str(bad), "--out", str(out)],
        [sys.executable, str(ROOT / "analyses" / "masks.py"), "--checkpoints", SMOL, SMOL, "--facts", str(FACTS),
         "--dtype", "int4", "--out", str(out)],
    ):  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert not out.exists()
