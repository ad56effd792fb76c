"""Cross-format gradient trace: per-parameter importance of each training format, accumulated during training.

The trainer back-propagates the storage-format and the query-format losses of a step one after the other and hands
each format's own gradient to :meth:`GradientTrace.capture` (the gradient of format ``f`` is what ``p.grad`` gained
in its backward pass, so the optimizer still sees their sum). After the optimizer step,
:meth:`GradientTrace.record_update` credits each format with ``|g_f * delta|``, where ``delta`` is the parameter
change of that step: an update-weighted importance that ignores gradients the optimizer did not act on.

Per format and HF parameter name the trace keeps ``sum |g|`` and ``sum |g * delta|`` and the number of steps in which
the format took part; :meth:`mean_abs_grad` divides. In two-stage training the storage format is traced in stage 1
and the query format in stage 2; in mixed training both are traced at every step. The trace is written as
``trace.safetensors`` into every checkpoint and restored on resume, so a resumed run has the same trace.

In a LoRA stage (:mod:`mechrecall.lab.adapters`) the trainable parameters are the adapter factors, traced under their
Hugging Face-style names (``model.layers.0.self_attn.q_proj.lora_A.weight``). For per-base-parameter importance,
set the stage's ``trace_base_grads``: the frozen base weights then get gradients as well (never updated) and the trace
holds each format's mean ``|dL/dW|`` for them under their usual names, which the masks analysis reads as it reads a
full fine-tune's; ``grad_x_update`` is recorded for the factors only (the base weights do not move).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

TRACE_FILE = "trace.safetensors"


def _named(model):
    """Parameters under Hugging Face names (a peft-wrapped model's names without peft's prefixes and segments)."""
    from mechrecall.lab.adapters import unwrapped_name

    return ((unwrapped_name(n), p) for n, p in model.named_parameters())


KINDS = ("abs_grad", "grad_x_update")


def _whole(t: Tensor) -> Tensor:
    """``t`` on the CPU, gathered first if it is an FSDP shard (a collective: every process calls it in turn)."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).cpu()


def _like(acc: Tensor, new: Tensor) -> Tensor:
    """``acc`` where ``new`` lives: its device, and sharded as ``new`` is under FSDP (a resumed trace is whole)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(new, DTensor) and not isinstance(acc, DTensor):
        return distribute_tensor(acc.to(new.device), new.device_mesh, new.placements)
    return acc.to(new.device)


@dataclass
class GradientTrace:
    """Accumulated per-format importances, keyed ``[kind][format][hf_name]``; ``steps[format]`` counts steps."""

    sums: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    steps: dict[str, int] = field(default_factory=dict)
    _seen: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _step_grads: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    _before: dict[str, Tensor] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ during training
    def capture(self, fmt: str, model) -> None:
        """Call right after ``loss_fmt.backward()``: record what this backward added to every ``.grad``."""
        grads = {}
        for name, p in _named(model):
            if p.grad is None:
                continue
            g = p.grad.detach()
            own = g - self._seen[name] if name in self._seen else g.clone()
            self._seen[name] = g.clone()
            grads[name] = own
            acc = self.sums["abs_grad"].setdefault(fmt, {})
            # (a resumed trace comes back on the CPU, whole; it accumulates where the model lives, sharded like it)
            acc[name] = _like(acc[name], own) + own.abs() if name in acc else own.abs()
        self._step_grads[fmt] = grads
        self.steps[fmt] = self.steps.get(fmt, 0) + 1

    def before_update(self, model, params=None) -> None:
        """Call before ``optimizer.step()``: remember the parameters to measure this step's update (only ``params``,
        the optimizer's, when given: traced frozen weights do not move, so they get no update record)."""
        keep = None if params is None else {id(p) for p in params}
        self._before = {
            n: p.detach().clone() for n, p in _named(model) if p.grad is not None and (keep is None or id(p) in keep)
        }

    def record_update(self, model) -> None:
        """Call after ``optimizer.step()``: credit ``|g_f * delta|`` to every format of the step, then reset."""
        params = dict(_named(model))
        for fmt, grads in self._step_grads.items():
            acc = self.sums["grad_x_update"].setdefault(fmt, {})
            for name, g in grads.items():
                if name not in self._before:
                    continue
                contrib = (g * (params[name].detach() - self._before[name])).abs()
                acc[name] = _like(acc[name], contrib) + contrib if name in acc else contrib
        self._seen, self._step_grads, self._before = {}, {}, {}

    # ------------------------------------------------------------------ reading
    @property
    def formats(self) -> list[str]:
        return sorted(self.steps)

    def mean_abs_grad(self, fmt: str) -> dict[str, Tensor]:
        """Mean |gradient| per parameter over the steps in which ``fmt`` was trained."""
        return {n: v / self.steps[fmt] for n, v in self.sums["abs_grad"][fmt].items()}

    def grad_x_update(self, fmt: str) -> dict[str, Tensor]:
        """Total ``|g_fmt * delta|`` per parameter (how much of the actual update this format's gradient drove)."""
        return dict(self.sums["grad_x_update"][fmt])

    def importance(self, fmt: str, kind: str = "abs_grad") -> dict[str, Tensor]:
        if fmt not in self.steps:
            raise KeyError(f"the trace has no {fmt!r} steps (it has {self.formats})")
        if kind not in KINDS:
            raise ValueError(f"unknown importance kind {kind!r}; expected one of {KINDS}")
        return self.mean_abs_grad(fmt) if kind == "abs_grad" else self.grad_x_update(fmt)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """The accumulated sums on the CPU (what a checkpoint stores) and the step counts."""
        sums = {k: {f: {n: _whole(t) for n, t in d.items()} for f, d in v.items()} for k, v in self.sums.items()}
        return {"sums": sums, "steps": dict(self.steps)}

    @classmethod
    def from_state(cls, state: dict | None) -> GradientTrace:
        if not state:
            return cls()
        return cls(sums={k: {f: dict(v) for f, v in state["sums"][k].items()} for k in KINDS}, steps=state["steps"])

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/trace.safetensors`` (the caller makes the folder write atomic)."""
        path = Path(folder) / TRACE_FILE
        tensors = {
            f"{kind}/{fmt}/{name}": t.detach().cpu().contiguous()
            for kind in KINDS
            for fmt, d in self.sums[kind].items()
            for name, t in d.items()
        }
        save_file(tensors, str(path), metadata={"steps": json.dumps(self.steps)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> GradientTrace:
        path = Path(folder)
        path = path / TRACE_FILE if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist: train with trace=true (the default) to record it")
        sums: dict[str, dict[str, dict[str, Tensor]]] = {k: {} for k in KINDS}
        with safe_open(str(path), "pt") as f:
            steps = json.loads(f.metadata()["steps"])
            for key in f.keys():
                kind, fmt, name = key.split("/", 2)
                sums[kind].setdefault(fmt, {})[name] = f.get_tensor(key)
        return cls(sums=sums, steps=steps)
