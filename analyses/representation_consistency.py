"""Finding: representation consistency of a two-stage / mixed checkpoint pair on held-out facts.

    python analyses/representation_consistency.py --two-stage default-s0-two-stage --mixed default-s0-mixed --out runs/default

Runs mechrecall.report.consistency (gradient and representation measures, backend parity; also writes
consistency.json / .html), then writes the representation part as OUT/representation_consistency.json and its figure as
OUT/representation_consistency.html.
"""

import sys

from _common import consistency_part

if __name__ == "__main__":
    sys.exit(consistency_part("representation", __doc__))
