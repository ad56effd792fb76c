"""Adapters for a training stage, through ``peft``: LoRA (and DoRA, rsLoRA, ... via ``adapter_options``).

A stage with ``trainable="lora"`` wraps the model in a :class:`peft.PeftModel` whose LoRA layers sit on the modules
named in ``lora_targets`` (matched on the last component of the module name, as ``peft`` does), with rank
``lora_rank`` and ``lora_alpha``; ``lora_embedding_rank`` adds a LoRA of that rank to the input embedding, and when the
unembedding is tied to it, ``peft``'s ``ensure_weight_tying`` puts the same update on the unembedding (so the merged,
still-tied model computes what the adapted one did). Any other ``peft.LoraConfig`` field goes through
``adapter_options`` (e.g. ``{"use_dora": true}``); an option ``peft`` rejects is one error naming it.

Determinism: the LoRA factors are initialised under ``torch`` RNG seeded by (seed, stage) inside a forked RNG, so a
stage's initialisation is a pure function of its seed and nothing else's random state is touched. Adapters carry no
dropout (the lab's training is exactly resumable; ``lora_dropout`` is refused).

At the end of the stage :func:`merge_adapters` folds every update into its base weight with ``peft``'s per-layer merge,
a tied pair's shared weight once (``peft``'s ``merge_and_unload`` merges both tied modules into the one weight, adding
the update twice: a wrong model), and the result is a plain Hugging Face model under its usual parameter names.

Per-base-parameter importance: with ``trace_base_grads`` the base weights also receive gradients (they are left out of
the optimizer, so they do not move), and the gradient trace records each format's ``|dL/dW|`` under the base
weights' Hugging Face names next to the adapter factors' (``mechrecall.lab.trace``). :func:`base_updates` gives the
update ``delta W`` each adapted base weight has received so far (the merged weight minus the base).
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from mechrecall.lab.config import StageConfig

__all__ = [
    "adapter_state",
    "apply_lora",
    "base_updates",
    "is_adapted",
    "load_adapter_state",
    "lora_config",
    "merge_adapters",
    "merged_copy",
    "tie_gradients",
    "unwrapped_name",
]

_ADAPTER = "default"


def unwrapped_name(name: str) -> str:
    """The Hugging Face name of a parameter of a ``peft``-wrapped model: ``base_model.model.`` and the adapter's and
    base layer's segments dropped (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``,
    ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``). Plain names come back unchanged."""
    name = name.removeprefix("base_model.model.")
    name = name.replace(".base_layer.", ".")
    return re.sub(rf"\.{_ADAPTER}(\.|$)", r"\1", name)


def is_adapted(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


def _output_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings()
    return None if out is None else next(n for n, m in model.named_modules() if m is out)


def _tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def lora_config(model: nn.Module, cfg: StageConfig):
    """The ``peft.LoraConfig`` of a stage (targets, ranks, alpha, extra options), checked against ``model``."""
    from peft import LoraConfig

    options = dict(cfg.adapter_options)
    if "lora_dropout" in options:
        raise ValueError(
            "adapter_options.lora_dropout: adapters train without dropout here (its random state is not in the "
            "checkpoints, so a resumed run would differ)"
        )
    for key in ("modules_to_save", "trainable_token_indices", "layers_to_transform", "target_parameters"):
        if options.get(key):
            raise ValueError(
                f"adapter_options.{key}: not supported by the trainer (its merge and resume handle LoRA layers on "
                f"whole modules only)"
            )
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections

    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    missing = [t for t in cfg.lora_targets if t not in leaves]
    if missing:
        raise ValueError(
            f"lora_targets {missing} match no Linear layer of the {type(model).__name__} "
            f"(its Linear layers end in: {', '.join(sorted(leaves))})"
        )
    out_name = _output_name(model)
    if _tied(model) and out_name is not None and out_name.rsplit(".", 1)[-1] in cfg.lora_targets:
        raise ValueError(
            f"lora_targets {list(cfg.lora_targets)}: {out_name!r} is tied to the input embedding (an update of it would "
            f"change both); use lora_embedding_rank for a tied low-rank update of the two"
        )
    targets = list(cfg.lora_targets)
    ranks, alphas = {}, {}
    tie = False
    if cfg.lora_embedding_rank:
        emb = _embedding_name(model)
        targets.append(emb)
        ranks[emb], alphas[emb] = cfg.lora_embedding_rank, cfg.lora_alpha
        if _tied(model):
            # peft ties the unembedding's LoRA to the embedding's; without its own pattern entry it would get the
            # linear rank's scaling (alpha / lora_rank) on factors of the embedding's rank: a different update
            tie, out = True, _output_name(model)
            ranks[out], alphas[out] = cfg.lora_embedding_rank, cfg.lora_alpha
    kwargs = dict(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        ensure_weight_tying=tie,
        bias="none",
    )
    for key in options:
        if key in kwargs and key not in ("bias",):
            raise ValueError(f"adapter_options.{key}: set it through the stage's own lora_* field instead")
    kwargs.update(options)
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter_options {options}: peft's LoraConfig refuses them: {e}") from None


def apply_lora(model: nn.Module, cfg: StageConfig, seed: int, *, trace_base_grads: bool = False):
    """``(peft model, trainable parameters)``: ``model`` frozen with the stage's LoRA adapters on it.

    With ``trace_base_grads`` the base weights keep ``requires_grad`` (for the trace) but are not returned among the
    trainable parameters, so the optimizer never moves them.
    """
    from peft import get_peft_model

    config = lora_config(model, cfg)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # handled: see lora_config
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"peft cannot build the adapters {config.target_modules}: {e}") from None
    if config.ensure_weight_tying:
        _check_tied(peft_model)
    aliases = {id(t) for t, _ in _tied_factor_pairs(peft_model)}
    # the unembedding's factors are views of the embedding's: one set of trainable tensors (tie_gradients folds the
    # views' gradients into it), else AdamW would update the shared memory twice per step with two sets of moments
    trainable = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in aliases]
    if trace_base_grads:
        for p in peft_model.parameters():
            p.requires_grad_(True)
    return peft_model, trainable


def _check_tied(peft_model) -> None:
    """The unembedding's LoRA must share the embedding's factors (peft ties them only for the module names it knows:
    an untied pair would train two different updates of one tied weight, which no merged model reproduces)."""
    from peft.tuners.lora import LoraLayer

    emb, out = peft_model.get_input_embeddings(), peft_model.get_output_embeddings()
    ok = isinstance(out, LoraLayer) and _ADAPTER in out.lora_A and out.scaling == emb.scaling
    if ok:
        shared = {t.data_ptr() for t in (emb.lora_embedding_A[_ADAPTER], emb.lora_embedding_B[_ADAPTER])}
        ok = {out.lora_A[_ADAPTER].weight.data_ptr(), out.lora_B[_ADAPTER].weight.data_ptr()} == shared
    if not ok:
        model = peft_model.get_base_model()
        raise ValueError(
            f"lora_embedding_rank: peft cannot tie an embedding adapter of {type(model).__name__} (embedding "
            f"{_embedding_name(model)!r}) to its tied unembedding; use lora_embedding_rank=0 or full fine-tuning"
        )


def _tied_factor_pairs(peft_model) -> list[tuple[Tensor, Tensor]]:
    """(the unembedding's factor, the embedding factor it is a transposed view of) for a tied embedding adapter."""
    from peft.tuners.lora import LoraLayer

    emb, out = peft_model.get_input_embeddings(), peft_model.get_output_embeddings()
    if not (isinstance(out, LoraLayer) and _ADAPTER in out.lora_A and isinstance(emb, LoraLayer)):
        return []
    if _ADAPTER not in getattr(emb, "lora_embedding_A", {}):
        return []
    pairs = [(out.lora_A[_ADAPTER].weight, emb.lora_embedding_B[_ADAPTER]),
             (out.lora_B[_ADAPTER].weight, emb.lora_embedding_A[_ADAPTER])]  # fmt: skip
    return [(a, b) for a, b in pairs if a.data_ptr() == b.data_ptr()]


def tie_gradients(peft_model) -> None:
    """Call after each backward: add the tied unembedding factors' gradients (transposed) into the embedding factors
    they view and clear them, so the one trainable set gets the whole gradient of the shared update."""
    for alias, owner in _tied_factor_pairs(peft_model):
        if alias.grad is None:
            continue
        extra = alias.grad.T
        owner.grad = extra.clone() if owner.grad is None else owner.grad + extra
        alias.grad = None


def _lora_layers(peft_model) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and _ADAPTER in m.scaling]


def _bases(peft_model) -> dict[str, Tensor]:
    """The base weight of every adapted module under its Hugging Face name (a tied pair's shared weight once)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, layer in _lora_layers(peft_model):
        weight = layer.get_base_layer().weight
        if weight.data_ptr() not in seen:
            seen.add(weight.data_ptr())
            out[unwrapped_name(name) + ".weight"] = weight
    return out


def _merge_layers(peft_model) -> list:
    """Merge each adapter into its base weight with ``peft``'s own per-layer merge (LoRA, DoRA, ...), a tied pair's
    shared weight once (the tied unembedding's adapter is the embedding's, checked when it was built); returns the
    merged layers."""
    merged, seen = [], set()
    for _, layer in _lora_layers(peft_model):
        key = layer.get_base_layer().weight.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        layer.merge(adapter_names=[_ADAPTER])
        merged.append(layer)
    return merged


def merge_adapters(peft_model) -> nn.Module:
    """Fold every adapter into its base weight and return the plain model (Hugging Face names), unfrozen."""
    _merge_layers(peft_model)
    base = peft_model.unload()  # drops the LoRA layers, keeping the (merged) base layers
    for p in base.parameters():
        p.requires_grad_(True)
    return base


def merged_copy(peft_model) -> nn.Module:
    """A plain copy of the adapted model with every update folded in; ``peft_model`` is left exactly as it was (its
    base weights are merged, read and restored bit for bit)."""
    bases = {name: w.detach().clone() for name, w in _bases(peft_model).items()}
    layers = _merge_layers(peft_model)
    try:
        current = {unwrapped_name(n): p.detach().clone() for n, p in peft_model.named_parameters() if ".lora_" not in n}
    finally:
        with torch.no_grad():
            for name, weight in _bases(peft_model).items():
                weight.data = bases[name]  # (some merges rebind .data rather than add in place)
        for layer in layers:
            layer.merged_adapters.clear()
    inner = peft_model.get_base_model()
    device = next(inner.parameters()).device
    with torch.device(device), torch.random.fork_rng(devices=[]):  # (its random init is overwritten below)
        fresh = type(inner)(inner.config)
    fresh.generation_config = inner.generation_config
    with torch.no_grad():
        for name, p in fresh.named_parameters():  # a tied pair appears once
            p.copy_(current[name])
    return fresh.eval()


def base_updates(peft_model) -> dict[str, Tensor]:
    """``delta W`` of every adapted base weight (merged minus base), on the CPU, under Hugging Face names."""
    merged = dict(merged_copy(peft_model).named_parameters())
    return {name: (merged[name] - w).detach().cpu() for name, w in _bases(peft_model).items()}


def adapter_state(peft_model) -> dict[str, dict[str, Tensor]]:
    """What a resumable checkpoint needs beyond the merged weights: the adapter factors and the adapted modules'
    base weights (the merged weights alone cannot be split back into base and update), on the CPU."""
    from peft import get_peft_model_state_dict

    factors = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    bases = {name: w.detach().cpu().clone() for name, w in _bases(peft_model).items()}
    return {"factors": factors, "bases": bases}


def load_adapter_state(peft_model, state: dict[str, dict[str, Tensor]]) -> None:
    """Restore :func:`adapter_state` into a model that :func:`apply_lora` built from the merged checkpoint."""
    from peft import set_peft_model_state_dict

    bases = _bases(peft_model)
    missing = sorted(set(bases) - set(state["bases"]))
    if missing:
        raise ValueError(f"the checkpoint's adapter state lacks the base weights of {missing} (other lora_targets?)")
    with torch.no_grad():
        for name, weight in bases.items():
            weight.copy_(state["bases"][name])
    result = set_peft_model_state_dict(peft_model, state["factors"])
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"the checkpoint's adapter holds weights this stage's adapters lack: {result.unexpected_keys}")
    lost = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    if lost:
        raise ValueError(f"the checkpoint's adapter state lacks the factors {lost} (other lora_targets?)")
