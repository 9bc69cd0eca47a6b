#!/usr/bin/env bash
# Runs bench/gpu_check.py on a bare GPU machine. The packages its image lacks travel as wheels in
# .whl/ (`python bench/gpu_check.py --plan` says which and how to make them); they are installed
# into /tmp/site, and the checkout itself is put on PYTHONPATH (it is not installed there).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SAFE_GPU_CHECK_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec python3 bench/gpu_check.py "$@"
