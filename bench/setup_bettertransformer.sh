#!/usr/bin/env bash
# A separate venv with Optimum's BetterTransformer, the reference fxbt is measured against:
# optimum 1.23.3 (the last with BetterTransformer) needs transformers 4.48.3. Not a dependency of fxbt.
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv-bettertransformer
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import optimum.bettertransformer" 2>/dev/null; then
  echo "$venv ready"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0   # pinned: no CUDA build
"$venv/bin/pip" install -q --disable-pip-version-check "optimum==1.23.3" "transformers==4.48.3"
"$venv/bin/python" -c "import optimum.bettertransformer; print('BetterTransformer ready')"
