"""Per-parameter gradients of a fact's answer loss, in either format, under Hugging Face parameter names.

The *answer loss* of an example is the mean next-token cross-entropy on its answer tokens (plus end-of-text in the
query format): for a storage example that is the value inside the biography prefix, for a query example the value
after "Answer:". :func:`per_example_grads` computes one gradient per example in a batch with ``torch.func``
(``vmap(grad(functional_call))``), optionally only for a subset of parameters, and optionally random-projects each
flattened gradient to ``project_dim`` numbers (a fixed Gaussian projection, the same for every call with the same
seed) so that per-fact gradients fit in memory at scale. :func:`gradient_stats` streams over many examples and
keeps per-format aggregates (mean gradient, mean absolute gradient) per parameter.

Every architecture :mod:`mechrecall.arch` supports works: parameters are the ``*ForCausalLM``'s own
``named_parameters()`` (tied weights once, under their first name: ``functional_call`` ties them again), and the
forward gets an all-ones attention mask (GPT-2 would otherwise inspect the ids for padding, which ``vmap`` cannot).
Inputs go to the model's device and per-example gradients are computed there in the model's dtype (the loss in
float32); the aggregates of :func:`gradient_stats` (means, mean |g|, kept or projected per-example rows) accumulate
in float32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor
from torch.func import functional_call, grad, vmap

from mechrecall.arch import attention_implementation
from mechrecall.devices import check_memory, model_device, nbytes, release_memory, to_cpu
from mechrecall.facts import Example
from mechrecall.tokenization import collate_examples, encode_example, pad_id

__all__ = [
    "ParamFilter",
    "select_params",
    "answer_batch",
    "per_example_grads",
    "per_example_grads_loop",
    "iter_example_grads",
    "CountSketch",
    "VMAP_BUDGET",
    "vmap_bytes",
    "scored_positions",
    "flatten",
    "Projection",
    "GradientStats",
    "gradient_stats",
]

ParamFilter = Callable[[str], bool]


def select_params(model, include: ParamFilter | None = None) -> dict[str, Tensor]:
    """Detached parameters by HF name (``include(name)`` filters; tied weights appear once, under their first name)."""
    return {n: p.detach() for n, p in model.named_parameters() if include is None or include(n)}


def answer_batch(tokenizer, examples: Sequence[Example]):
    """Token batch whose labels mark each example's answer tokens (and end-of-text for queries)."""
    pad = pad_id(tokenizer)
    return collate_examples([encode_example(tokenizer, ex) for ex in examples], pad)


def _answer_loss(model, params, rest, ids: Int[Tensor, " pos"], labels: Int[Tensor, " pos"], keep: Tensor | None):
    # An all-ones mask: batches are right-padded and attention is causal, so padding (after the answer, label -100)
    # cannot change any scored position. Giving a mask at all keeps GPT-2 from looking for padding in the ids (data-
    # dependent control flow, which vmap refuses); for the other families it gives the same logits as no mask.
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids[None]), "use_cache": False}
    if keep is None:
        logits = functional_call(model, {**rest, **params}, (), inputs).logits
        return F.cross_entropy(logits[0, :-1].float(), labels[1:], ignore_index=-100)
    # logits only where some row of the batch is scored (the same positions for every row, so vmap sees no
    # data-dependent shape): the unembedding of the other positions is most of a large vocabulary's cost
    logits = functional_call(model, {**rest, **params}, (), {**inputs, "logits_to_keep": keep}).logits
    return F.cross_entropy(logits[0].float(), labels[keep + 1], ignore_index=-100)


def scored_positions(model, labels: Int[Tensor, "batch pos"]) -> Tensor | None:
    """The positions whose logits some row's loss reads (``labels[:, p + 1] != -100``), for the model's
    ``logits_to_keep`` (on the CPU: Hugging Face indexes the last device's states with it, and a CPU index serves any
    device); None when its forward has no such argument (then every position's logits are computed)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    return (labels[:, 1:] != -100).any(0).nonzero()[:, 0].cpu()


def per_example_grads(
    model,
    batch,
    params: dict[str, Tensor] | None = None,
) -> dict[str, Float[Tensor, "batch ..."]]:
    """One gradient of the answer loss per row of ``batch``, for ``params`` (default: all), keyed by HF name.

    The batch goes to the model's device; the gradients stay there, in the parameters' dtype (the loss is computed
    in float32). ``params`` are tensors of the model's parameters under their ``named_parameters()`` names. A model
    whose forward ``vmap`` cannot trace (Bloom's custom GELU) gets the same gradients from
    :func:`iter_example_grads`.
    """
    params = select_params(model) if params is None else params
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    batch = batch.to(model_device(model))
    keep = scored_positions(model, batch.labels)
    fn = vmap(grad(lambda p, i, y: _answer_loss(model, p, rest, i, y, keep)), in_dims=(None, 0, 0))
    # eager attention inside vmap: sdpa's mask builder (transformers' default) branches on the mask's values, which
    # vmap refuses; the model's own setting is back when this returns
    try:
        with attention_implementation(model, "eager"):
            return fn(params, batch.input_ids, batch.labels)
    except RuntimeError as e:
        if "functorch" not in str(e) and "vmap" not in str(e):
            raise
    # a forward vmap cannot trace (a custom autograd.Function such as Bloom's GELU, Python branching on values): the
    # same gradients one ordinary backward at a time, the generic path
    rows = list(iter_example_grads(model, batch, params))
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def per_example_grads_loop(model, batch, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Reference implementation: one ordinary backward per example (for tests and benchmarks).

    Leaves every ``.grad`` of the model ``None`` afterwards; results on the model's device, in its dtype.
    """
    names = list((select_params(model) if params is None else params).keys())
    named = dict(model.named_parameters())
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    batch = batch.to(model_device(model))
    for i in range(len(batch)):
        row = batch.index(torch.tensor([i], device=batch.input_ids.device))
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=row.input_ids, attention_mask=row.attention_mask, use_cache=False).logits
        F.cross_entropy(logits[0, :-1].float(), row.labels[0, 1:], ignore_index=-100).backward()
        for n in names:
            g = named[n].grad
            out[n].append(torch.zeros_like(named[n]) if g is None else g.detach().clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


@contextmanager
def _gradients_of(model, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Inside: only ``names`` require gradients and every ``.grad`` starts empty; after: the model's own
    ``requires_grad`` flags and ``.grad`` tensors are back (a user's model may hold gradients of its own)."""
    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    grads = {n: p.grad for n, p in named.items()}
    wanted = set(names)
    try:
        for n, p in named.items():
            p.requires_grad_(n in wanted)
            p.grad = None
        yield {n: named[n] for n in names}
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]


def iter_example_grads(
    model, batch, params: dict[str, Tensor] | None = None, reduce: Callable[[dict[str, Tensor]], object] | None = None
) -> Iterator:
    """The gradients of :func:`per_example_grads`, one row at a time, each from an ordinary backward of that row.

    Memory: the model's gradient buffers plus the one gradient handed out (a copy, in the parameters' dtype on their
    device), whatever the batch size; any attention implementation works (no ``vmap``). The loss is the same answer
    loss (vocabulary logits at the row's scored positions only, where the model takes ``logits_to_keep``); results
    equal :func:`per_example_grads`'s within float tolerance. The model's ``requires_grad`` flags and ``.grad`` are
    restored afterwards.

    ``reduce``, if given, is applied to each row's gradients where they are computed (the parameters' own ``.grad``
    tensors, not copies) and its result is yielded instead: e.g. a :class:`CountSketch`, so that no gradient copy is
    ever held."""
    names = list((select_params(model) if params is None else params).keys())
    unknown = set(names) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"parameters {sorted(unknown)[:3]} are not among the model's named_parameters()")
    batch = batch.to(model_device(model))
    with _gradients_of(model, names) as live, torch.enable_grad():  # (callers may hold no_grad)
        for i in range(len(batch)):
            row = batch.index(torch.tensor([i], device=batch.input_ids.device))
            keep = scored_positions(model, row.labels)
            kwargs = {"input_ids": row.input_ids, "attention_mask": row.attention_mask, "use_cache": False}
            if keep is None:
                logits = model(**kwargs).logits
                loss = F.cross_entropy(logits[0, :-1].float(), row.labels[0, 1:], ignore_index=-100)
            else:
                logits = model(**kwargs, logits_to_keep=keep).logits
                loss = F.cross_entropy(logits[0].float(), row.labels[0, keep.to(row.labels.device) + 1])
            loss.backward()
            del logits, loss
            if reduce is not None:
                out = reduce({n: torch.zeros_like(p) if p.grad is None else p.grad.detach() for n, p in live.items()})
            else:
                out = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in live.items()}
            for p in live.values():
                p.grad = None
            yield out


# vmap over a batch holds the batch's gradients and about as much again of intermediates; above this many bytes the
# streamed path (one gradient at a time) is used by default. The lab's models stay well below it (their published
# numbers were computed with vmap), a 135M-parameter model's two gradients are above.
VMAP_BUDGET = 1 << 30


def vmap_bytes(params: dict[str, Tensor], batch_size: int) -> int:
    """What :func:`per_example_grads` holds for a batch: ``batch_size`` gradients of ``params`` and vmap's
    intermediates, counted as as much again."""
    return 2 * batch_size * nbytes(params.values())


def stats_memory(
    params: dict[str, Tensor], n_examples: int, *, streamed: bool, batch_size: int, kept_dim: int | None = None
) -> tuple[int, int]:
    """What :func:`gradient_stats` needs, in bytes: ``(on the model's device, on the CPU)``. On the device: the
    gradient buffers and one gradient (streamed) or :func:`vmap_bytes` of a batch, plus 1 GiB for one example's
    activations; on the CPU: the two float32 sums and the kept per-example rows (``kept_dim`` floats each)."""
    device = (2 * nbytes(params.values()) if streamed else vmap_bytes(params, batch_size)) + (1 << 30)
    numel = sum(p.numel() for p in params.values())
    return device, 8 * numel + 4 * n_examples * (kept_dim or 0)


def flatten(grads: dict[str, Tensor]) -> Float[Tensor, "batch n_params"]:
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


class Projection:
    """A fixed Gaussian random projection R^n -> R^k (Johnson-Lindenstrauss), generated in chunks from a seed."""

    def __init__(self, n: int, k: int, seed: int = 0, chunk: int = 1 << 16):
        self.n, self.k, self.seed, self.chunk = n, k, seed, chunk

    def __call__(self, x: Float[Tensor, "batch n"]) -> Float[Tensor, "batch k"]:
        """``x @ R`` on the CPU in float32; ``x`` may live on any device (each chunk's product is taken there, in
        float32, with ``R`` generated on the CPU, so the projection is the same matrix everywhere)."""
        if x.shape[1] != self.n:
            raise ValueError(f"projection from {self.n} dimensions got rows of {x.shape[1]}")
        out = torch.zeros(x.shape[0], self.k)
        for j, start in enumerate(range(0, self.n, self.chunk)):
            stop = min(self.n, start + self.chunk)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + j)
            r = torch.randn(stop - start, self.k, generator=g) / self.k**0.5
            out += (x[:, start:stop].float() @ r.to(x.device)).cpu()
        return out


class CountSketch:
    """A seeded CountSketch of each parameter tensor into ``k`` buckets: entry i of a parameter goes, with a random
    sign, into a random bucket (Charikar et al. 2002; the sparse cousin of TRAK's Gaussian projection). Hashes and signs
    are drawn in chunks from ``(seed, parameter, chunk)`` where the gradient lives, so nothing of the parameters' size
    is stored and the same gradient always gets the same sketch.

    The sketch of a group of parameters is the sum of its members' rows; ``<S(a), S(b)>`` is an unbiased estimate of
    ``<a, b>``, so group cosines are estimated with an error of order ``1 / sqrt(k)`` (measured:
    ``benchmarks/scale.py`` and ``tests/test_consistency.py``)."""

    def __init__(self, names: Sequence[str], k: int, seed: int = 0, chunk: int = 1 << 22):
        if k < 1:
            raise ValueError(f"sketch dimension {k}: need at least 1")
        self.names, self.k, self.seed, self.chunk = list(names), k, seed, chunk

    def __call__(self, grads: dict[str, Tensor]) -> Float[Tensor, "param k"]:
        """``[parameter, k]`` float32 sketches (rows in ``self.names`` order) on the CPU."""
        rows = []
        for j, name in enumerate(self.names):
            flat = grads[name].detach().reshape(-1)
            out = torch.zeros(self.k, dtype=torch.float32, device=flat.device)
            for c, start in enumerate(range(0, flat.numel(), self.chunk)):
                part = flat[start : start + self.chunk].float()
                g = torch.Generator().manual_seed(((self.seed * 1_000_003 + j) * 1_000_033 + c) % (1 << 63))
                bucket = torch.randint(self.k, (part.numel(),), generator=g).to(flat.device)
                sign = (torch.randint(2, (part.numel(),), generator=g) * 2 - 1).to(flat.device, torch.float32)
                out.index_add_(0, bucket, part * sign)
            rows.append(out.cpu())
        return torch.stack(rows)


@dataclass
class GradientStats:
    """Per-format aggregates over examples: mean gradient and mean absolute gradient per HF parameter."""

    format: str
    n: int
    mean: dict[str, Tensor]
    mean_abs: dict[str, Tensor]
    per_example: Tensor | None = None  # [n, k] projected (or flat) per-example gradients, if kept

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"mean.{k}": v.contiguous() for k, v in self.mean.items()}
        tensors |= {f"mean_abs.{k}": v.contiguous() for k, v in self.mean_abs.items()}
        if self.per_example is not None:
            tensors["per_example"] = self.per_example.contiguous()
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"format": self.format, "n": str(self.n)})
        tmp.replace(path)
        return path


def gradient_stats(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    params: dict[str, Tensor] | None = None,
    batch_size: int = 16,
    keep_per_example: bool = False,
    project_dim: int | None = None,
    seed: int = 0,
    streamed: bool | None = None,
) -> GradientStats:
    """Stream per-example gradients over ``examples`` in batches and aggregate them (memory: one batch at a time).

    ``streamed=True`` computes them one example at a time with ordinary backwards (:func:`iter_example_grads`):
    memory is then the model, its gradient buffers, one gradient and the float32 sums on the CPU, whatever
    ``batch_size``; ``False`` uses ``vmap`` over each batch (faster for small models; ``batch_size`` gradients and
    vmap's intermediates at once); None (default) streams when a batch's vmap would hold more than
    :data:`VMAP_BUDGET` bytes (:func:`vmap_bytes`). Either way the same numbers within float tolerance.

    Gradients are computed where the model lives, in its dtype; sums, means and the kept (optionally projected)
    per-example rows accumulate in float32 on the CPU.
    """
    params = select_params(model) if params is None else params
    if streamed is None:
        streamed = vmap_bytes(params, batch_size) > VMAP_BUDGET
    fmt = ",".join(sorted({e.format for e in examples}))
    numel = sum(p.numel() for p in params.values())
    kept_dim = (project_dim or numel) if keep_per_example else None
    on_device, on_cpu = stats_memory(params, len(examples), streamed=streamed, batch_size=batch_size,
                                     kept_dim=kept_dim)  # fmt: skip
    device = model_device(model)
    if device.type == "cpu":  # one pool: the gradients and the sums
        on_device, on_cpu = on_device + on_cpu, 0
    # before any allocation: one line saying what it needs, not an out-of-memory kill halfway through
    mode = "streamed" if streamed else f"vmap over {batch_size} examples"
    check_memory(f"per-example gradients ({mode}) of {numel:,} parameters", on_device, device,
                 "measure on a device with more free memory (a GPU: --device cuda), or --dtype bf16")  # fmt: skip
    if on_cpu:
        check_memory(f"the float32 gradient sums of {numel:,} parameters", on_cpu, "cpu", "a machine with more RAM")
    total = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    total_abs = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    kept: list[Tensor] = []
    proj = Projection(sum(p.numel() for p in params.values()), project_dim, seed) if project_dim else None
    was_training = model.training
    model.eval()
    for start in range(0, len(examples), batch_size):
        batch = answer_batch(tokenizer, examples[start : start + batch_size])
        # one gradient at a time (streamed: memory of one, any model size) or the batch's at once (vmap: faster)
        parts = ({n: g[None] for n, g in one.items()} for one in iter_example_grads(model, batch, params)) if streamed \
            else iter([per_example_grads(model, batch, params)])  # fmt: skip
        for grads in parts:
            for n, g in grads.items():
                total[n] += g.sum(0, dtype=torch.float32).cpu()
                total_abs[n] += g.abs().sum(0, dtype=torch.float32).cpu()
            if keep_per_example:
                flat = flatten(grads)
                kept.append(proj(flat) if proj is not None else to_cpu(flat))
            freed = nbytes(grads.values())
            del grads
            release_memory(freed)  # a pretrained model's batch: hand the freed heap back, or it only grows
    model.train(was_training)
    n = len(examples)
    return GradientStats(
        fmt,
        n,
        {k: v / n for k, v in total.items()},
        {k: v / n for k, v in total_abs.items()},
        torch.cat(kept) if kept else None,
    )
