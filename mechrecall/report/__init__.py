"""The reports: JSON + figures per finding, the self-contained page, and its browser check.

``consistency`` (findings 1-2), ``masks`` (finding 3), ``patching`` (findings 4-5: patching and attribution),
``page`` (``report.html``), ``plotting`` (one plotly page helper), ``browser`` (headless-Chromium check of the page),
``reproduce`` (the one-command pipeline: data, both regimes, every analysis, the page).
Reports build on the toolkit and the lab.
"""
