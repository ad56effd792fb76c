"""The cross-format alignment objective: it lowers the distance it optimizes, resumes exactly, and refuses misuse."""

import pytest
import torch
from safetensors.torch import load_file

from mechrecall.lab.config import get_preset
from mechrecall.lab.models import load_checkpoint
from mechrecall.lab.objectives import AlignData, alignment_distance, default_layers, prompt_end, teacher_states
from mechrecall.lab.train import train
from mechrecall.tokenization import collate

SHORT = [
    "data.n_people=40",
    "two_stage.stage1.steps=30",
    "two_stage.stage2.steps=10",
    "two_stage.stage2.eval_every=6",
    "two_stage.stage2.stop_at_trained_qa=null",
    "mixed.steps=12",
    "mixed.eval_every=6",
    "save_every=100",
]


def test_prompt_end_is_the_position_before_the_first_answer_token():
    b = collate([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]], [[3, 4], [2]], pad_id=0)
    assert prompt_end(b).tolist() == [2, 1]


def _distance(run, regime, teacher_model_path, kind="cosine"):
    model, tok, _ = load_checkpoint(run / regime / "final")
    teacher_model, _, _ = load_checkpoint(teacher_model_path)
    from mechrecall.lab.models import lab_dataset
    from mechrecall.loading import load_model

    ds = lab_dataset(load_model(str(run / regime / "final")))
    layers = default_layers(model)
    teacher = teacher_states(teacher_model, AlignData.build(ds, tok), layers)
    return alignment_distance(model, tok, ds, teacher, layers, kind)


ALIGNED = [*SHORT, "two_stage.stage2.align_weight=1.0", "save_every=5"]


@pytest.fixture(scope="module")
def aligned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned")
    return out, train(get_preset("micro", ALIGNED), "two_stage", out, progress=False)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    train(get_preset("micro", SHORT), "two_stage", out, progress=False)
    return out


def test_stage2_alignment_lowers_the_query_to_storage_distance_it_optimizes(plain_run, aligned_run):
    """Stage 2 with the term pulls trained QA states towards the stage-1 model's biography states; without it they
    stay further apart (same data, steps and seed)."""
    aligned_dir, meta = aligned_run
    stage1 = plain_run / "two_stage" / "stage1"
    a, b = (
        load_file(stage1 / "model.safetensors"),
        load_file(aligned_dir / "two_stage" / "stage1" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same stage 1: the term acts in stage 2 only
    d_plain = _distance(plain_run, "two_stage", stage1)
    d_aligned = _distance(aligned_dir, "two_stage", stage1)
    assert d_aligned < 0.8 * d_plain, (d_aligned, d_plain)
    history = [h for h in __import__("json").loads((aligned_dir / "two_stage" / "history.json").read_text())
               if h["stage"] == "stage2"]  # fmt: skip
    assert history and all(h["loss_align"] >= 0 for h in history)  # logged next to the LM loss
    assert 0 <= meta["metrics"]["heldout_qa"] <= 1


def test_live_alignment_in_mixed_training_lowers_its_distance(tmp_path):
    plain = get_preset("micro", SHORT)
    aligned = get_preset("micro", [*SHORT, "mixed.align_weight=1.0", "mixed.align_teacher=live"])
    train(plain, "mixed", tmp_path / "plain", progress=False)
    train(aligned, "mixed", tmp_path / "aligned", progress=False)
    # the live teacher is each model's own biography states at the end
    d_plain = _distance(tmp_path / "plain", "mixed", tmp_path / "plain" / "mixed" / "final")
    d_aligned = _distance(tmp_path / "aligned", "mixed", tmp_path / "aligned" / "mixed" / "final")
    assert d_aligned < d_plain, (d_aligned, d_plain)


def test_an_interrupted_aligned_stage_resumes_exactly(tmp_path, aligned_run):
    preset = get_preset("micro", ALIGNED)
    assert train(preset, "two_stage", tmp_path / "cut", progress=False, stop_after=36) == {"interrupted_at": 36}
    train(preset, "two_stage", tmp_path / "cut", progress=False)
    a = load_file(aligned_run[0] / "two_stage" / "final" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "two_stage" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["two_stage.stage1.align_weight=1.0"], "needs query batches"),
        (["two_stage.stage2.align_weight=1.0", "two_stage.stage2.align_layers=[9]"], r"align_layers \[9\]"),
        (
            [
                "two_stage.stage2.align_weight=1.0",
                "two_stage.stage2.align_loss=contrastive",
                "two_stage.stage2.batch_query=1",
            ],
            "batch_query >= 2",
        ),  # fmt: skip
    ],
)
def test_misused_alignment_fails_in_one_line(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        train(get_preset("micro", [*SHORT, "two_stage.stage1.steps=2", *extra]), "two_stage", tmp_path, progress=False)


def test_contrastive_term_is_low_when_each_query_state_is_nearest_its_own_fact():
    from mechrecall.lab.objectives import alignment_term

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 2, 16, generator=g)
    matched = teacher + 0.01 * torch.randn(6, 2, 16, generator=g)
    shuffled = matched[torch.tensor([1, 2, 3, 4, 5, 0])]
    low, high = alignment_term(matched, teacher, "contrastive"), alignment_term(shuffled, teacher, "contrastive")
    assert low < 0.05 < 3.0 < high, (low, high)
    # two rows of one fact (another template): neither is the other's negative, so matching both costs nothing extra
    dup_t = torch.cat([teacher[:1], teacher[:1], teacher[1:3]])
    dup_q = torch.cat([matched[:1], matched[:1], matched[1:3]])
    ids = torch.tensor([0, 0, 1, 2])
    assert alignment_term(dup_q, dup_t, "contrastive", ids) < 0.05
    assert alignment_term(dup_q, dup_t, "contrastive") > 0.3  # told they are different facts, they are negatives
    with pytest.raises(ValueError, match="align_loss"):
        alignment_term(matched, teacher, "l1")


def test_contrastive_stage2_alignment_lowers_the_contrastive_loss_it_optimizes(tmp_path, plain_run):
    """The InfoNCE variant: after stage 2 with it, each trained QA state is nearer its own fact's stage-1 biography
    state relative to the other facts' than after plain stage 2 (the loss over all trained QA rows at once)."""
    extra = ["two_stage.stage2.align_weight=1.0", "two_stage.stage2.align_loss=contrastive"]
    train(get_preset("micro", [*SHORT, *extra]), "two_stage", tmp_path / "con", progress=False)
    stage1 = plain_run / "two_stage" / "stage1"
    d_plain = _distance(plain_run, "two_stage", stage1, "contrastive")
    d_con = _distance(tmp_path / "con", "two_stage", stage1, "contrastive")
    assert d_con < 0.9 * d_plain, (d_con, d_plain)
