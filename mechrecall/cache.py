"""Residual-stream caches of facts in one format, at named token roles, streamed to safetensors shards.

For a list of examples (storage or query format) :func:`cache_residuals` runs the model in batches and keeps, for
every layer and site (``resid_pre`` = input of block L, ``resid_mid`` = after its attention, ``resid_post`` =
output of block L), the hidden state at each requested role position:

- ``subject``: last token of the subject mention (the name; a pronoun in pronoun biographies),
- ``relation``: last token of the relation words,
- ``final``: last prompt token, the one that predicts the answer.

Shards of ``shard_size`` examples are written as they fill (atomic writes), so memory does not grow with the
number of facts; :class:`ResidualCache` reads them back with TransformerLens-like indexing::

    cache = ResidualCache.load(folder)
    cache["resid_post", 1]            # Float[Tensor, "fact role d_model"]
    cache["resid_post", -1, "final"]  # Float[Tensor, "fact d_model"]

Three backends produce the same numbers (``tests/test_cache.py``): plain Hugging Face (forward hooks, default),
a TransformerLens bridge (``blocks.L.hook_resid_*``) and nnsight (``model.layers[L]`` inputs and outputs).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechrecall.facts import Example
from mechrecall.io import atomic_write_json
from mechrecall.tokenization import EncodedExample, collate_examples, encode_example

SITES = ("resid_pre", "resid_mid", "resid_post")
DEFAULT_ROLES = ("subject", "relation", "final")


def role_positions(encoded: Sequence[EncodedExample], roles: Sequence[str]) -> torch.Tensor:
    """``[n_examples, n_roles]`` token positions (last token of each role)."""
    return torch.tensor([[e.last(r) for r in roles] for e in encoded], dtype=torch.long)


def _decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@torch.no_grad()
def residuals_hf(
    model, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str] = SITES
) -> dict[str, Float[Tensor, "layer batch pos d_model"]]:
    """Every layer's residual stream at ``sites`` for one batch, from forward hooks on a plain HF decoder."""
    layers = _decoder_layers(model)
    store: dict[str, list] = {s: [None] * len(layers) for s in sites}
    handles = []
    for i, layer in enumerate(layers):
        if "resid_pre" in sites:
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, kw, i=i: store["resid_pre"].__setitem__(
                        i, (a[0] if a else kw["hidden_states"]).detach()
                    ),
                    with_kwargs=True,
                )
            )
        if "resid_mid" in sites:
            ln = layer.post_attention_layernorm
            handles.append(
                ln.register_forward_pre_hook(lambda m, a, i=i: store["resid_mid"].__setitem__(i, a[0].detach()))
            )
        if "resid_post" in sites:
            handles.append(
                layer.register_forward_hook(
                    lambda m, a, out, i=i: store["resid_post"].__setitem__(
                        i, (out[0] if isinstance(out, tuple) else out).detach()
                    )
                )
            )
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {s: torch.stack(v) for s, v in store.items()}


@torch.no_grad()
def residuals_tl(bridge, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str] = SITES) -> dict[str, Tensor]:
    """Same as :func:`residuals_hf` from a TransformerLens ``TransformerBridge`` (raw mode)."""
    names = [f"blocks.{i}.hook_{s}" for s in sites for i in range(bridge.cfg.n_layers)]
    _, cache = bridge.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=lambda n: n in names)
    return {s: torch.stack([cache[f"blocks.{i}.hook_{s}"] for i in range(bridge.cfg.n_layers)]) for s in sites}


@torch.no_grad()
def residuals_nnsight(
    model, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str] = SITES
) -> dict[str, Tensor]:
    """Same as :func:`residuals_hf` from an ``nnsight.TransformersModel``."""
    n_layers = len(model.model.layers)
    saved: dict[str, list] = {s: [] for s in sites}
    with model.trace({"input_ids": input_ids, "attention_mask": attention_mask}):
        for i in range(n_layers):
            layer = model.model.layers[i]
            if "resid_pre" in sites:
                saved["resid_pre"].append(layer.input.save())
            if "resid_mid" in sites:
                saved["resid_mid"].append(layer.post_attention_layernorm.input.save())
            if "resid_post" in sites:
                saved["resid_post"].append(layer.output.save())
    return {s: torch.stack([v[0] if isinstance(v, tuple) else v for v in vals]) for s, vals in saved.items()}


_BACKENDS = {"hf": residuals_hf, "tl": residuals_tl, "nnsight": residuals_nnsight}


@dataclass
class ResidualCache:
    """Residual states per (site, layer) at role positions: ``data[site]`` is ``[layer, fact, role, d_model]``."""

    data: dict[str, Float[Tensor, "layer fact role d_model"]]
    roles: tuple[str, ...]
    meta: dict

    def __getitem__(self, key) -> Tensor:
        site, layer, *role = key if isinstance(key, tuple) else (key, slice(None))
        out = self.data[site][layer]
        if role:
            return out[..., self.roles.index(role[0]), :]
        return out

    @property
    def n_layers(self) -> int:
        return next(iter(self.data.values())).shape[0]

    @classmethod
    def load(cls, folder: str | Path) -> ResidualCache:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{folder}: no residual cache here (meta.json is missing)")
        meta = json.loads(meta_path.read_text())
        shards = [load_file(folder / name) for name in meta["shards"]]
        data = {s: torch.cat([sh[s] for sh in shards], dim=1) for s in meta["sites"]}
        return cls(data, tuple(meta["roles"]), meta)


def cache_residuals(
    model,
    tokenizer,
    examples: Sequence[Example],
    out_dir: str | Path | None = None,
    *,
    roles: Sequence[str] = DEFAULT_ROLES,
    sites: Sequence[str] = SITES,
    backend: str = "hf",
    batch_size: int = 64,
    shard_size: int = 1024,
    all_positions: bool = False,
    meta: dict | None = None,
) -> ResidualCache | Path:
    """Residual states at ``roles`` for every example; streamed to ``out_dir`` shards when given (returns the
    folder), else kept in memory (returns the :class:`ResidualCache`). ``model`` is the backend's model object.

    ``all_positions=True`` keeps every prompt position instead (the role axis becomes positions ``"0"``, ``"1"``,
    ... up to the longest prompt, zero-padded; ``meta["prompt_lengths"]`` says how many are real). Either way
    ``meta["role_positions"]`` records each example's role positions."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    fn = _BACKENDS[backend]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded_all = [encode_example(tokenizer, ex, add_eos=False) for ex in examples]
    width = max(e.prompt_len for e in encoded_all)
    axis = tuple(str(i) for i in range(width)) if all_positions else tuple(roles)
    info = {
        "roles": list(axis),
        "all_positions": all_positions,
        "prompt_lengths": [e.prompt_len for e in encoded_all],
        "role_positions": [
            {r: e.last(r) for r in ("subject", "relation", "final") if r == "final" or e.roles.get(r)}
            for e in encoded_all
        ],
        "sites": list(sites),
        "backend": backend,
        "format": sorted({e.format for e in examples}),
        "fact_ids": [[e.subject_id, e.relation, e.format] for e in examples],
        **(meta or {}),
    }
    pending: dict[str, list[Tensor]] = {s: [] for s in sites}
    n_pending, shards, kept = 0, [], {s: [] for s in sites}
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def flush() -> None:
        nonlocal n_pending
        if not n_pending:
            return
        block = {s: torch.cat(v, dim=1).contiguous() for s, v in pending.items()}
        name = f"shard-{len(shards):05d}.safetensors"
        tmp = folder / f".{name}.tmp"
        save_file(block, str(tmp))
        tmp.replace(folder / name)
        shards.append(name)
        for v in pending.values():
            v.clear()
        n_pending = 0

    for start in range(0, len(examples), batch_size):
        encoded = encoded_all[start : start + batch_size]
        batch = collate_examples(encoded, pad)
        states = fn(model, batch.input_ids, batch.attention_mask, sites)
        rows = torch.arange(len(encoded))[:, None]
        for s, st in states.items():
            if all_positions:  # [layer, b, width, d], zero past each prompt
                picked = torch.zeros(st.shape[0], len(encoded), width, st.shape[-1], dtype=st.dtype)
                for i, e in enumerate(encoded):
                    picked[:, i, : e.prompt_len] = st[:, i, : e.prompt_len]
            else:
                picked = st[:, rows, role_positions(encoded, roles)]  # [layer, b, r, d]
            (pending if folder is not None else kept)[s].append(picked.float().cpu())
        if folder is not None:
            n_pending += len(encoded)
            if n_pending >= shard_size:
                flush()
    if folder is None:
        return ResidualCache({s: torch.cat(v, dim=1) for s, v in kept.items()}, axis, info)
    flush()
    atomic_write_json(folder / "meta.json", {**info, "shards": shards})
    return folder
