"""Training on several processes under Hugging Face ``accelerate`` (DDP or FSDP2), with the same global batch as one
process.

    accelerate launch --multi_gpu --num_processes 8 -m mechrecall train --preset default --regime mixed --out runs/x
    accelerate launch --config_file configs/accelerate/fsdp-3b.yaml -m mechrecall train --preset llama-3.2-3b ...
    accelerate launch --multi_gpu --num_processes 2 -m mechrecall train ...   (gloo processes on a CPU machine)
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m mechrecall train ...   (FSDP2 on a CPU machine)

One process (no launcher, ``WORLD_SIZE`` unset or 1) trains exactly as before: none of this module is used. Under a
launcher every process builds the same step batches (a pure function of seed, stage and step) and takes every
``world``-th row of them; the loss of each format is its shard's summed token loss over the global number of scored
tokens, times ``world``, so that DDP's gradient average is the gradient of the global batch's mean loss. Each
format is back-propagated on its own (forward, backward, then the next format), so the per-format gradient the trace
captures is already reduced across processes: the trace is the global one on every process. Only the main process
writes data, history and checkpoints; the others wait for it. A checkpoint records the number of processes that wrote
it, and a resume with another number is refused (the shards would differ).

FSDP (a launch with ``ACCELERATE_USE_FSDP`` set: ``--use_fsdp`` or a config file with ``distributed_type: FSDP``;
FSDP2 only) shards every parameter, gradient and optimizer state over the processes with ``torch``'s
``fully_shard``, applied here per decoder block (the blocks :mod:`mechrecall.arch` names, whatever the
architecture) and once over the embedding, final norm and unembedding, as ``accelerate``'s own FSDP2 recipe does (the
trainer shards the model itself because ``accelerate`` silently falls back to DDP on CPU processes, which is what the
tests run). Parameter names are unchanged and tied embeddings stay tied. The trace accumulates each process's shard;
checkpoints gather the full weights, optimizer state and trace (collectives every process joins) and the main process
writes them, so a checkpoint is a plain Hugging Face folder that loads anywhere; a resume loads the full state on
every process and re-shards it. Evaluation forwards run on every process in lockstep (a sharded forward needs all of
them). Mixed precision is the trainer's ``--autocast`` (float32 weights and reductions), not the config's
``mixed_precision``. LoRA stages under FSDP are refused (untested).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Processes", "processes", "reshard", "shard_model", "sharded_lm_loss"]


@dataclass
class Processes:
    """This process's place in a launch: ``rank`` of ``world``; ``accelerator`` is None for a single process."""

    rank: int = 0
    world: int = 1
    accelerator: object | None = None
    fsdp: bool = False  # parameters sharded with FSDP2 (else each process holds the whole model, DDP)

    @property
    def mode(self) -> str:
        return "single" if self.world == 1 else "fsdp" if self.fsdp else "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forwards through: DDP over ``model`` under a launch (re-wrap after adapters change the
        trainable parameters), ``model`` itself alone."""
        if self.world == 1:
            return model
        if self.fsdp:
            return shard_model(model)
        return self.accelerator.prepare_model(model, device_placement=True)

    def after_forwards(self, model: nn.Module) -> None:
        """Call after forwards without a backward (evaluation): re-shards an FSDP model (see :func:`reshard`)."""
        if self.fsdp:
            reshard(model)

    def full_model_state(self, model: nn.Module) -> dict | None:
        """Under FSDP the full (gathered) state dict on the CPU, on the main process (every process must call it);
        None otherwise (the model itself is whole)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = model.get_output_embeddings()
        if out is not None and out.weight is model.get_input_embeddings().weight:  # tied: saved once, as HF does
            name = next(n for n, m in model.named_modules() if m is out) + ".weight"
            state.pop(name, None)
        return state

    def optimizer_state(self, model: nn.Module, opt) -> dict:
        """The optimizer state a checkpoint keeps: under FSDP the full one, gathered (every process calls this)."""
        if not self.fsdp:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model: nn.Module, opt, state: dict) -> None:
        if not self.fsdp:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))

    def shard(self, rows: Tensor) -> Tensor:
        """This process's rows of a global batch (every ``world``-th, from ``rank``)."""
        return rows if self.world == 1 else rows[self.rank :: self.world]

    def total(self, value: float) -> float:
        """Sum of ``value`` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def on_main(self, fn) -> None:
        """Run ``fn()`` on the main process only; then every process raises the main process's ``ValueError``
        (its message) alike, or none does: no process of a launch goes on to wait at a collective alone."""
        error = None
        if self.main:
            try:
                fn()
            except ValueError as e:
                error = str(e.args[0]) if e.args else str(e)
        if self.world > 1:
            from accelerate.utils import gather_object

            error = gather_object([error])[0]
        if error is not None:
            raise ValueError(error)

    def agree(self, what: str, text: str) -> None:
        """Raise on every process unless all of them were started with the same ``text`` (their settings)."""
        if self.world == 1:
            return
        from accelerate.utils import gather_object

        mine = hashlib.sha256(text.encode()).hexdigest()[:12]
        seen = gather_object([mine])
        if len(set(seen)) > 1:
            ranks = ", ".join(f"rank {r}: {h}" for r, h in enumerate(seen))
            raise ValueError(f"the {self.world} processes of this launch disagree on {what} ({ranks}): start every "
                             f"process with the same arguments")  # fmt: skip


def processes(device: torch.device) -> Processes:
    """The launch this process belongs to: an ``accelerate`` / ``torchrun`` launch (``WORLD_SIZE`` > 1) starts the
    process group through ``accelerate.Accelerator`` (gloo on the CPU, NCCL on GPUs), sharded with FSDP2 when the
    launch asks for FSDP; otherwise a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if fsdp and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ValueError(
            f"FSDP_VERSION={os.environ['FSDP_VERSION']}: the trainer shards with FSDP2 only (fsdp_version: 2)"
        )
    from accelerate import Accelerator

    acc = Accelerator(cpu=device.type == "cpu")
    return Processes(acc.process_index, acc.num_processes, acc, fsdp)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over ``model`` in place: one unit per decoder block, one over the embedding, final norm and unembedding
    (a tied pair's one weight), then the root (whatever is left, e.g. GPT-2's position embedding)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from mechrecall import arch

    if isinstance(model, FSDPModule):  # sharded in an earlier stage
        return model
    for block in arch.blocks(model):
        fully_shard(block)
    ends: list[nn.Module] = []
    for module in (arch.embedding(model), arch.final_norm(model), arch.unembed(model)):
        if all(module is not m for m in ends):
            ends.append(module)
    fully_shard(ends)
    fully_shard(model)
    return model


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit back in its sharded state. FSDP2 swaps a module's registered parameters between the
    sharded ones (what the optimizer holds) and gathered copies; a forward with no backward after it (evaluation)
    can leave the root's gathered copies registered, which checkpoints and the next step must not see."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def sharded_lm_loss(
    net: nn.Module, batch, procs: Processes, *, scored_logits: bool = False, model: nn.Module | None = None
) -> Tensor:
    """This shard's part of the global batch's mean next-token loss, scaled for DDP's average over processes.

    ``scored_logits``: logits only at the positions some row of this shard scores (Hugging Face's
    ``logits_to_keep``, passed through the DDP / FSDP wrapper's own forward, which both need), where the
    single-process loss gathers each row's scored positions; same loss, other float summation order. ``model`` is the
    module under ``net``'s wrapper (where the forward's signature is read)."""
    from mechrecall.gradients import scored_positions

    labels = batch.labels[:, 1:]
    keep = scored_positions(net if model is None else model, batch.labels) if scored_logits else None
    if keep is None:
        logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    else:
        logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
        labels = labels[:, keep.to(labels.device)]
    summed = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    count = procs.total(float((labels != -100).sum()))
    return summed / count * procs.world
