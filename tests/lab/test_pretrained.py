"""Both regimes from a pretrained base (``model.source``): any architecture, its own (BPE) tokenizer, resumable.

The base here is a tiny random model of a real architecture saved as a ``save_pretrained`` folder with a byte-level
BPE tokenizer trained on the lab's texts (multi-token names and values, no padding token): the same code path as
SmolLM2 or Pythia, at test size.
"""

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mechrecall.lab.bios import generate
from mechrecall.lab.config import get_preset
from mechrecall.lab.train import train
from mechrecall.loading import load_model
from tests.tiny_models import tiny_model

TINY = [
    "data.n_people=12",
    "data.name_style=multi_token",
    "mixed.steps=6",
    "mixed.eval_every=3",
    "mixed.batch_storage=4",
    "mixed.batch_query=4",
    "save_every=4",
    "two_stage.stage1.steps=4",
    "two_stage.stage1.batch_storage=4",
    "two_stage.stage2.steps=4",
    "two_stage.stage2.batch_query=4",
    "two_stage.stage2.eval_every=2",
    "two_stage.stage2.stop_at_trained_qa=null",
]


def _bpe(texts) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["gpt_neox", "qwen2"])
def base(request, tmp_path_factory):
    """A pretrained-base folder: tiny ``arch`` model + BPE tokenizer (no pad token), and the preset overrides."""
    preset = get_preset("micro", TINY)
    ds = generate(preset.data.spec(), preset.seed)
    tok = _bpe([d for d in ds.documents()] + [ex.text for ex in ds.query_examples()])
    assert tok.pad_token_id is None and len(tok) <= 512
    folder = tmp_path_factory.mktemp(f"base_{request.param}")
    tiny_model(request.param, vocab_size=512).save_pretrained(folder)
    tok.save_pretrained(folder)
    return request.param, folder, [*TINY, f"model.source={folder}"]


@pytest.mark.parametrize("regime", ["two_stage", "mixed"])
def test_both_regimes_train_from_a_pretrained_base_with_its_own_tokenizer(base, regime, tmp_path):
    name, folder, overrides = base
    preset = get_preset("micro", overrides)
    meta = train(preset, regime, tmp_path, progress=False)
    start = load_file(folder / "model.safetensors")
    data_base = load_file(tmp_path / "data" / "base" / "model.safetensors")
    final = load_file(tmp_path / regime / "final" / "model.safetensors")
    assert data_base.keys() == start.keys() and all(torch.equal(data_base[k], start[k]) for k in start)
    assert any(not torch.equal(final[k], start[k]) for k in start)  # it trained the pretrained weights
    loaded = load_model(str(tmp_path / regime / "final"))
    assert loaded.model.config.model_type == name
    assert loaded.tokenizer.pad_token == "<|endoftext|>" and len(loaded.tokenizer) == len(
        PreTrainedTokenizerFast.from_pretrained(folder)
    )
    m = meta["metrics"]
    assert all(0 <= m[k] <= 1 for k in ("heldout_qa", "trained_qa", "storage"))
    assert meta["config"]["model"]["source"] == str(folder)
    from mechrecall.lab.trace import GradientTrace

    trace = GradientTrace.load(tmp_path / regime / "final")
    fmt = "query" if regime == "two_stage" else "storage"
    names = {n for n, _ in loaded.model.named_parameters()}  # (a file may store legacy names: GPT-NeoX embed_out)
    assert set(trace.sums["abs_grad"][fmt]) == names  # per-format importance under the base's HF names


def test_a_pretrained_run_resumes_exactly(base, tmp_path):
    _, _, overrides = base
    preset = get_preset("micro", overrides)
    train(preset, "mixed", tmp_path / "full", progress=False)
    assert train(preset, "mixed", tmp_path / "cut", progress=False, stop_after=5) == {"interrupted_at": 5}
    train(preset, "mixed", tmp_path / "cut", progress=False)
    a = load_file(tmp_path / "full" / "mixed" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "mixed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tokenizer_that_cannot_place_the_roles_fails_in_one_line(tmp_path):
    """A tokenizer whose one token spans prompt and answer (no pre-tokenizer: a whole text is one word): one error
    naming the fact, the text and the base, and nothing written."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")
    folder = tmp_path / "base"
    tiny_model("llama", vocab_size=512).save_pretrained(folder)
    hf.save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"fact '0/\w+', storage\[0\] with the tokenizer of {folder}: .*straddles"):
        train(get_preset("micro", [*TINY, f"model.source={folder}"]), "mixed", tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "data" / "base").exists()


def test_a_base_with_dropout_trains_without_it_and_a_changed_source_is_refused(base, tmp_path):
    """GPT-2's configs carry dropout 0.1: the base is saved without it (deterministic, exactly resumable); a run
    folder built from one source refuses another."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechrecall.lab.models import pretrained_base

    _, folder, overrides = base
    preset = get_preset("micro", overrides)
    ds = generate(preset.data.spec(), preset.seed)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=256)).save_pretrained(gpt2)
    PreTrainedTokenizerFast.from_pretrained(folder).save_pretrained(gpt2)
    model, _ = pretrained_base(str(gpt2), ds)
    assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (0.0, 0.0, 0.0)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    train(preset, "mixed", tmp_path / "run", progress=False, stop_after=1)
    other = get_preset("micro", [*TINY, f"model.source={gpt2}"])
    with pytest.raises(ValueError, match=r"holds another run \(config.model.source: "):
        train(other, "mixed", tmp_path / "run", progress=False)  # the regime folder's run record refuses it
    with pytest.raises(ValueError, match=r"built from model.source=.* but the preset asks for"):
        train(other, "two_stage", tmp_path / "run", progress=False)  # and the shared data/ folder, for a new regime


def test_reproduce_without_a_trace_runs_every_analysis_on_a_pretrained_pair(tmp_path, monkeypatch):
    """A pretrained-base preset trained with trace=false (the smollm2 preset's default): ``reproduce`` still runs
    every analysis; the masks come from post-hoc importance on the run's facts against the registered base."""
    import json

    from mechrecall.report import reproduce as rep

    preset = get_preset("micro", TINY)
    ds = generate(preset.data.spec(), preset.seed)
    tok = _bpe([*ds.documents(), *(ex.text for ex in ds.query_examples())])
    folder = tmp_path / "base"
    tiny_model("gpt_neox", vocab_size=512).save_pretrained(folder)
    tok.save_pretrained(folder)
    small = {"consistency": {"n_people": 6, "grad_facts": 6},
             "masks": {"count": 12, "consistency_facts": 4, "draws": 1, "sweep_draws": 1, "ks": (0.05,)},
             "patching": {"n_people": 4, "n_pairs": 4}, "attribution": {"n_people": 2}}  # fmt: skip
    from dataclasses import replace

    from mechrecall.report.analysis import analyses

    for a in analyses():  # each analysis' sizes on a pretrained base, made tiny
        module = __import__(f"mechrecall.report.{a.name}", fromlist=["ANALYSIS"])
        monkeypatch.setattr(module, "ANALYSIS", replace(a, pretrained_sizes=small.get(a.name, {})))
    out = tmp_path / "out"
    results = rep.reproduce("micro", out, overrides=[*TINY, f"model.source={folder}", "trace=false"],
                            registry=tmp_path / "registry.yaml", progress=False)  # fmt: skip
    assert set(results["analysis_seconds"]) == {"consistency", "masks", "patching", "attribution"}
    masks = json.loads((out / "masks.json").read_text())
    assert masks["importance"] == "posthoc_x_update"
    assert not (out / "seed0" / "mixed" / "final" / "trace.safetensors").exists()
    entries = (tmp_path / "registry.yaml").read_text()
    assert f"base_model: {folder}" in entries

    # grafting on a trace-less pretrained pair: the update masks work; a trace mask is one clear error
    from mechrecall.checkpoint import CheckpointError
    from mechrecall.report.grafting import run as graft_run

    reg, recipients = tmp_path / "registry.yaml", {"two_stage": "micro-s0-two-stage"}
    res = graft_run("micro-s0-mixed", recipients, tmp_path / "graft", base=str(folder), registry=reg, ks=(0.05, 1.0),
                    sources=("update", "update:all"), draws=1)  # fmt: skip
    rows = {(r["source"], r["k"]): r for r in res["recipients"]["two_stage"]["rows"]}
    assert set(rows) == {(s, k) for s in ("update", "update:all") for k in (0.05, 1.0)}
    assert rows["update:all", 1.0]["heldout_after"] == res["donor_recall"]["heldout"]  # every parameter: the donor
    assert (tmp_path / "graft" / "grafting.json").exists()
    with pytest.raises(CheckpointError, match="trace=false"):
        graft_run("micro-s0-mixed", recipients, tmp_path / "graft2", base=str(folder), registry=reg, ks=(0.05,),
                  sources=("trace:abs_grad",))  # fmt: skip
    assert not (tmp_path / "graft2").exists()


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2", "qwen2", "gemma3_text"])
def test_alignment_objectives_train_on_pretrained_architectures(arch, tmp_path):
    """Both cross-format alignment recipes (stage 2 against the frozen stage-1 model; mixed against the live model,
    contrastive) run on real architectures' hidden states, log their term, and change what training does."""
    import json

    preset = get_preset("micro", TINY)
    ds = generate(preset.data.spec(), preset.seed)
    tok = _bpe([d for d in ds.documents()] + [ex.text for ex in ds.query_examples()])
    folder = tmp_path / "base"
    tiny_model(arch, vocab_size=512).save_pretrained(folder)
    tok.save_pretrained(folder)
    source = [*TINY, f"model.source={folder}"]
    aligned = {
        "two_stage": ["two_stage.stage2.align_weight=1.0"],
        "mixed": ["mixed.align_weight=1.0", "mixed.align_teacher=live", "mixed.align_loss=contrastive"],
    }
    for regime, extra in aligned.items():
        train(get_preset("micro", source), regime, tmp_path / "plain", progress=False)
        train(get_preset("micro", [*source, *extra]), regime, tmp_path / regime, progress=False)
        history = json.loads((tmp_path / regime / regime / "history.json").read_text())
        logged = [h["loss_align"] for h in history if "loss_align" in h]
        assert logged and all(v >= 0 and v == v for v in logged), (arch, regime, logged)
        a = load_file(tmp_path / "plain" / regime / "final" / "model.safetensors")
        b = load_file(tmp_path / regime / regime / "final" / "model.safetensors")
        assert any(not torch.equal(a[k], b[k]) for k in a)  # the term changed the updates
