"""Residual-stream caches of facts in one format, at named token roles, streamed to safetensors shards.

For a list of examples (storage or query format) :func:`cache_residuals` runs the model in batches and keeps, for
every layer and site (``resid_pre`` = input of block L, ``resid_mid`` = after its attention, ``resid_post`` =
output of block L), the hidden state at each requested role position:

- ``subject``: last token of the subject mention (the name; a pronoun in pronoun biographies),
- ``relation``: last token of the relation words,
- ``final``: last prompt token, the one that predicts the answer.

Where the blocks are is asked of :mod:`mechrecall.arch`, so every architecture it supports works. Architectures that
run attention and MLP in parallel off ``resid_pre`` (GPT-NeoX / Pythia with ``use_parallel_residual``) have no
``resid_mid``: asking for it raises a ``ValueError`` naming the architecture, and the default ``sites=None`` means
:func:`default_sites` (``resid_pre``, ``resid_mid``, ``resid_post`` where the model has them, else without
``resid_mid``).

Shards of ``shard_size`` examples are written as they fill, so memory does not grow with the
number of facts; :class:`ResidualCache` reads them back with TransformerLens-like indexing::

    cache = ResidualCache.load(folder)
    cache["resid_post", 1]            # Float[Tensor, "fact role d_model"]
    cache["resid_post", -1, "final"]  # Float[Tensor, "fact d_model"]

Three backends produce the same numbers (``tests/test_cache.py``, ``tests/test_architectures.py``): plain Hugging
Face (forward hooks through :func:`mechrecall.arch.hook_site`, default), a TransformerLens bridge
(``blocks.L.hook_resid_*``) and nnsight (the envoys at the module paths :func:`mechrecall.arch.site_path` gives).
Inputs go to the model's device; what is kept comes back to the CPU in float32, whatever the model's dtype.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechrecall import arch, devices
from mechrecall.facts import Example
from mechrecall.io import atomic_write_dir, atomic_write_json
from mechrecall.tokenization import EncodedExample, collate_examples, encode_example, pad_id

__all__ = [
    "SITES",
    "DEFAULT_ROLES",
    "role_positions",
    "default_sites",
    "residuals_hf",
    "residuals_tl",
    "residuals_nnsight",
    "ResidualCache",
    "cache_residuals",
]

SITES = ("resid_pre", "resid_mid", "resid_post")
DEFAULT_ROLES = ("subject", "relation", "final")


def role_positions(encoded: Sequence[EncodedExample], roles: Sequence[str]) -> torch.Tensor:
    """``[n_examples, n_roles]`` token positions (last token of each role)."""
    return torch.tensor([[e.last(r) for r in roles] for e in encoded], dtype=torch.long)


def default_sites(model_or_config) -> tuple[str, ...]:
    """The residual sites a model has: :data:`SITES`, without ``resid_mid`` for parallel-residual architectures."""
    if arch.resid_mid_module(model_or_config) is None:
        return tuple(s for s in SITES if s != "resid_mid")
    return SITES


def _check_sites(hf_model, sites: Sequence[str]) -> tuple[str, ...]:
    sites = tuple(sites)
    unknown = [s for s in sites if s not in SITES]
    if unknown:
        raise ValueError(f"unknown residual site {unknown[0]!r}; expected one of {', '.join(SITES)}")
    if "resid_mid" in sites and "resid_mid" not in default_sites(hf_model):
        name = arch.spec_of(hf_model).name
        raise ValueError(
            f"{name} has no resid_mid: its attention and MLP run in parallel off resid_pre (use_parallel_residual); "
            f"cache {', '.join(default_sites(hf_model))} (sites=None picks them)"
        )
    return sites


def _nnsight_module(wrapper):
    """The Hugging Face model an ``nnsight.TransformersModel`` wraps (``._module`` in nnsight 0.8, ``._model`` before)."""
    for attr in ("_module", "_model"):
        inner = getattr(wrapper, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    raise TypeError(f"{type(wrapper).__name__} is not an nnsight model wrapper (no ._module)")


def _hf_model(model, backend: str):
    """The plain Hugging Face model behind a backend's model object (a TransformerLens bridge, an nnsight wrapper)."""
    if backend == "tl":
        return model.original_model
    if backend == "nnsight":
        return _nnsight_module(model)
    return model


def _states_hf(model, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str]) -> dict[str, Tensor]:
    """``{site: [layer, batch, pos, d_model]}`` on the model's device, in its dtype."""
    sites = _check_sites(model, sites)
    n_layers = len(arch.blocks(model))
    store: dict[str, list] = {s: [None] * n_layers for s in sites}
    handles = []
    try:
        for i in range(n_layers):
            for s in sites:
                handles.append(arch.hook_site(model, i, s, lambda t, s=s, i=i: store[s].__setitem__(i, t.detach())))
        device = devices.model_device(model)
        # the decoder stack alone: its blocks see the same inputs, and no vocabulary logits are computed
        arch.base_model(model)(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        for h in handles:
            h.remove()
    return {s: torch.stack(v) for s, v in store.items()}


def _states_tl(bridge, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str]) -> dict[str, Tensor]:
    sites = _check_sites(bridge.original_model, sites)
    n_layers = bridge.cfg.n_layers
    names = {f"blocks.{i}.hook_{s}" for s in sites for i in range(n_layers)}
    missing = sorted(names - set(bridge.hook_dict))
    if missing:
        raise ValueError(f"this TransformerLens bridge has no hook {missing[0]!r}")
    device = devices.model_device(bridge.original_model)
    _, cache = bridge.run_with_cache(
        input_ids.to(device), attention_mask=attention_mask.to(device), names_filter=lambda n: n in names
    )
    return {s: torch.stack([cache[f"blocks.{i}.hook_{s}"] for i in range(n_layers)]) for s in sites}


def _envoy(root, dotted: str):
    """``root.a.b.3.c`` for ``dotted="a.b.3.c"`` on an nnsight envoy (integer parts index module lists)."""
    node = root
    for part in dotted.split(".") if dotted else ():
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _states_nnsight(model, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str]) -> dict[str, Tensor]:
    hf = _nnsight_module(model)
    sites = _check_sites(hf, sites)
    n_layers = len(arch.blocks(hf))
    device = devices.model_device(hf)
    saved: dict[str, list] = {s: [] for s in sites}
    with model.trace({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}):
        for i in range(n_layers):
            for s in sites:
                path, direction = arch.site_path(hf, i, s)
                envoy = _envoy(model, path)
                saved[s].append((envoy.input if direction == "input" else envoy.output).save())
    return {s: torch.stack([v[0] if isinstance(v, tuple) else v for v in vals]) for s, vals in saved.items()}


_STATES = {"hf": _states_hf, "tl": _states_tl, "nnsight": _states_nnsight}


def _cpu(states: dict[str, Tensor]) -> dict[str, Tensor]:
    return {s: devices.to_cpu(v) for s, v in states.items()}


@torch.no_grad()
def residuals_hf(
    model, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str] | None = None
) -> dict[str, Float[Tensor, "layer batch pos d_model"]]:
    """Every layer's residual stream at ``sites`` (default :func:`default_sites`) for one batch, from forward hooks
    on a plain HF causal LM; on the CPU in float32."""
    return _cpu(_states_hf(model, input_ids, attention_mask, default_sites(model) if sites is None else sites))


@torch.no_grad()
def residuals_tl(
    bridge, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Same as :func:`residuals_hf` from a TransformerLens ``TransformerBridge`` (raw mode)."""
    sites = default_sites(bridge.original_model) if sites is None else sites
    return _cpu(_states_tl(bridge, input_ids, attention_mask, sites))


@torch.no_grad()
def residuals_nnsight(
    model, input_ids: Tensor, attention_mask: Tensor, sites: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """Same as :func:`residuals_hf` from an ``nnsight.TransformersModel``."""
    sites = default_sites(_nnsight_module(model)) if sites is None else sites
    return _cpu(_states_nnsight(model, input_ids, attention_mask, sites))


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
    sites: Sequence[str] | None = None,
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
    ``meta["role_positions"]`` records each example's role positions.

    ``sites=None`` caches :func:`default_sites` (``resid_pre``, ``resid_mid``, ``resid_post``; no ``resid_mid`` for
    parallel-residual models, where asking for it raises ``ValueError``). The model runs on its own device; role
    positions are picked there and only the picked states come back to the CPU, in float32."""
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    fn = _STATES[backend]
    hf = _hf_model(model, backend)
    sites = _check_sites(hf, default_sites(hf) if sites is None else sites)
    pad = pad_id(tokenizer)
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
    if out_dir is None:
        kept = _stream(model, fn, encoded_all, pad, sites, roles, batch_size, width, all_positions, None, shard_size)
        return ResidualCache({s: torch.cat(v, dim=1) for s, v in kept.items()}, axis, info)
    folder = Path(out_dir)
    if folder.is_dir():  # replaced whole below: only a cache may be there, never a user's other files
        foreign = [p.name for p in folder.iterdir() if p.name != "meta.json" and not p.name.startswith("shard-")]
        if foreign:
            raise ValueError(f"{folder}: holds {foreign[0]!r} and is not a residual cache: choose an empty folder")

    def fill(tmp: Path) -> None:
        shards = _stream(model, fn, encoded_all, pad, sites, roles, batch_size, width, all_positions, tmp, shard_size)
        atomic_write_json(tmp / "meta.json", {**info, "shards": shards})

    # All or nothing: the shards stream into a temporary folder beside ``out_dir`` that replaces it whole at the end,
    # so an interrupted run leaves the previous cache (or none) and never old metadata over new shards. A temporary
    # left by an interrupted run is removed first.
    for stale in folder.parent.glob(f".{folder.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return atomic_write_dir(folder, fill)


def _stream(model, fn, encoded_all, pad, sites, roles, batch_size, width, all_positions, folder, shard_size):
    """Run the model over the examples in batches and pick the states: into safetensors shards in ``folder`` (returns
    their names), or kept in memory when ``folder`` is None (returns the picked blocks per site)."""
    pending: dict[str, list[Tensor]] = {s: [] for s in sites}
    n_pending, shards, kept = 0, [], {s: [] for s in sites}

    def flush() -> None:
        nonlocal n_pending
        if not n_pending:
            return
        block = {s: torch.cat(v, dim=1).contiguous() for s, v in pending.items()}
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(block, str(folder / name))
        shards.append(name)
        for v in pending.values():
            v.clear()
        n_pending = 0

    for start in range(0, len(encoded_all), batch_size):
        encoded = encoded_all[start : start + batch_size]
        batch = collate_examples(encoded, pad)
        with torch.no_grad():
            states = fn(model, batch.input_ids, batch.attention_mask, sites)
        for s, st in states.items():
            if all_positions:  # [layer, b, width, d], zero past each prompt
                st = devices.to_cpu(st)
                picked = torch.zeros(st.shape[0], len(encoded), width, st.shape[-1], dtype=st.dtype)
                for i, e in enumerate(encoded):
                    picked[:, i, : e.prompt_len] = st[:, i, : e.prompt_len]
            else:
                rows = torch.arange(len(encoded), device=st.device)[:, None]
                picked = devices.to_cpu(st[:, rows, role_positions(encoded, roles).to(st.device)])  # [layer, b, r, d]
            (pending if folder is not None else kept)[s].append(picked)
        if folder is not None:
            n_pending += len(encoded)
            if n_pending >= shard_size:
                flush()
    if folder is None:
        return kept
    flush()
    return shards
