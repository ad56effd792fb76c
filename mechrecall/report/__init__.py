"""The reports: JSON + figures per finding, the self-contained page, and the one-command pipeline.

``analysis`` (the registry every report module joins with ``ANALYSIS = Analysis(...)``), ``consistency`` (findings
1-2), ``masks`` (finding 3), ``patching`` (finding 4: cross-format patching), ``attribution`` (finding 5: token-role
attribution), ``grafting``, ``predict`` and ``remedy`` (studies written beside a run by their ``analyses/`` scripts),
``page`` (``report.html``), ``browser`` (headless-Chromium check of the page), ``reproduce`` (data, both regimes,
every analysis, the page). Reports build on the toolkit and the lab.
"""
