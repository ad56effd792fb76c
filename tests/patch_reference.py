"""The reference for every patching test: one patch, one hooked forward of the whole prompt, no shortcut."""

import torch

from mechrecall import arch
from mechrecall.patching.core import capture


@torch.no_grad()
def reference_patch(model, base, source, site, L, j, head=None, metric="logit_diff"):
    """Metric per example after writing the source's ``site`` activation of layer ``L`` at named position ``j`` (one
    head's slice for ``site="head"``) into a whole-prompt forward of the base prompts."""
    acts, _, _ = capture(model, source.input_ids, site)
    b = torch.arange(len(base))
    val = acts[L][b, source.positions[:, j]]
    tgt = base.positions[:, j]
    d = arch.dims(model).head_dim

    def write(act):
        act = act.clone()
        if site == "head":
            act[b, tgt, head * d : (head + 1) * d] = val[:, head * d : (head + 1) * d]
        else:
            act[b, tgt] = val
        return act

    handles = arch.hook_site_write(model, L, site, write)
    try:
        full = model(input_ids=base.input_ids).logits.float()
    finally:
        for h in handles:
            h.remove()
    if metric == "answer_logprob":  # the whole teacher-forced answer: token k is predicted at readout + k
        total = torch.zeros(len(base))
        for i in range(len(base)):
            for k, tok in enumerate(base.answer_ids[i].tolist()):
                if tok >= 0:
                    total[i] += full[i, base.readout[i] + k].log_softmax(-1)[tok]
        return total
    logits = full[b, base.readout]
    if metric == "logprob":
        return logits.log_softmax(-1).gather(1, base.answer[:, None])[:, 0]
    return logits.gather(1, base.answer[:, None])[:, 0] - logits.gather(1, base.foil[:, None])[:, 0]
