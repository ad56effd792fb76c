"""The lab: a synthetic fact-injection setting that reproduces every finding on a CPU.

``bios`` (seeded synthetic people, bioS biographies and QA, the three-way person split), ``pools`` (value pools),
``tokenizer`` (word-level tokenizer for the generated corpus), ``config`` (validated presets and ``--set``
overrides), ``models`` (small Llama models built from a preset; ``lab_dataset``), ``train`` (two-stage and mixed
regimes), ``trace`` (per-format gradient trace during training), ``evaluate`` (the recall table per split and
attribute), ``stage2`` (the stage-2 trade-off sweep). The lab builds on the toolkit (``mechrecall.*``) and never the
other way round; the one-command pipeline that runs the lab and every report is :mod:`mechrecall.report.reproduce`.
"""
