"""mechrecall: how language models store injected facts and recall them from questions never trained on.

Modules (one concept each): ``facts`` (synthetic people, formats, role spans), ``tokenization``, ``config``
(validated presets), ``models`` (checkpoints), ``train`` (two-stage and mixed regimes), ``evaluate`` (exact-match
recall), ``registry`` (``checkpoints.yaml``), ``reproduce`` (the one-command pipeline).
"""

import os as _os

# Hugging Face's per-file progress bars drown ours; its hub is never reachable from the lab's machines.
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
