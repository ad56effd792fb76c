"""Training on several processes with Hugging Face ``accelerate`` (DDP), with the same global batch as one process.

    accelerate launch --num_processes 8 -m mechrecall train --preset default --regime mixed --out runs/x
    accelerate launch --cpu --num_processes 2 -m mechrecall train ...        (gloo on a CPU machine; what tests run)

One process (no launcher, ``WORLD_SIZE`` unset or 1) trains exactly as before: none of this module is used. Under a
launcher every process builds the same step batches (a pure function of seed, stage and step) and takes every
``world``-th row of them; the loss of each format is its shard's summed token loss over the global number of scored
tokens, times ``world``, so that DDP's gradient average is the gradient of the global batch's mean loss. Each
format is back-propagated on its own (forward, backward, then the next format), so the per-format gradient the trace
captures is already reduced across processes: the trace is the global one on every process. Only the main process
writes data, history and checkpoints; the others wait for it. A checkpoint records the number of processes that wrote
it, and a resume with another number is refused (the shards would differ).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Processes", "processes", "sharded_lm_loss"]


@dataclass
class Processes:
    """This process's place in a launch: ``rank`` of ``world``; ``accelerator`` is None for a single process."""

    rank: int = 0
    world: int = 1
    accelerator: object | None = None

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
        return self.accelerator.prepare_model(model, device_placement=True)

    def shard(self, rows: Tensor) -> Tensor:
        """This process's rows of a global batch (every ``world``-th, from ``rank``)."""
        return rows if self.world == 1 else rows[self.rank :: self.world]

    def total(self, value: float) -> float:
        """Sum of ``value`` over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

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
    process group through ``accelerate.Accelerator`` (gloo on the CPU, NCCL on GPUs); otherwise a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import Accelerator

    acc = Accelerator(cpu=device.type == "cpu")
    return Processes(acc.process_index, acc.num_processes, acc)


def sharded_lm_loss(net: nn.Module, batch, procs: Processes) -> Tensor:
    """This shard's part of the global batch's mean next-token loss, scaled for DDP's average over processes."""
    logits = net(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    summed = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    count = procs.total(float((labels != -100).sum()))
    return summed / count * procs.world
