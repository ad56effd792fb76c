"""Activation patching between formats and facts, attribution patching, and the ``python -m mechrecall.patching`` CLI.

See :mod:`mechrecall.patching.core` for the method and its conventions.
"""

from mechrecall.patching.core import (
    METRICS,
    SETTERS,
    SITES,
    WHOLE_ANSWER_METRICS,
    GaussianNoise,
    PatchInputs,
    PatchResult,
    activation_patch,
    capture,
    full_patch_logits,
    get_metric,
    is_whole_answer,
    register_metric,
    set_head,
    set_resid,
)
from mechrecall.patching.prompts import fact_inputs, fact_pairs

__all__ = [
    "METRICS",
    "SETTERS",
    "SITES",
    "WHOLE_ANSWER_METRICS",
    "GaussianNoise",
    "PatchInputs",
    "PatchResult",
    "activation_patch",
    "capture",
    "fact_inputs",
    "fact_pairs",
    "full_patch_logits",
    "get_metric",
    "is_whole_answer",
    "register_metric",
    "set_head",
    "set_resid",
]
