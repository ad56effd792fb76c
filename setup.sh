#!/usr/bin/env bash
# Set up .venv with the CPU build of torch (pinned first, so nothing can pull a CUDA build) and mechrecall itself.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]" "torch==2.13.0"
# headless Chromium for the report's browser test (Debian packages; needs root, skipped with a note otherwise)
if ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
      || echo "setup.sh: could not install chromium; the browser test will be skipped (failed under CI)"
  else
    echo "setup.sh: chromium missing and not root: install chromium chromium-driver for the browser test"
  fi
fi
.venv/bin/python -c "import torch, mechrecall; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "setup.sh: .venv ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
