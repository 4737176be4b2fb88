#!/usr/bin/env bash
# The benchmark's side venvs, for what the main environment cannot hold (each is idempotent: seconds once built):
#   bettertransformer  Optimum 1.23.3 (the last with BetterTransformer) on transformers 4.48.3, the reference
#                      fxbt is measured against; never a dependency of fxbt
#   transformers4      fxbt on transformers 4.57.6, the last 4.x, which has the HF fx tracer (frontend hf_fx)
# usage: bash bench/setup_venv.sh bettertransformer|transformers4
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  bettertransformer) packages=("optimum==1.23.3" "transformers==4.48.3"); ready="import optimum.bettertransformer" ;;
  transformers4) packages=(-e .. "transformers==4.57.6"); ready="import fxbt, transformers.utils.fx" ;;
  *) echo "usage: $0 bettertransformer|transformers4" >&2; exit 2 ;;
esac
venv=".venv-$1"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$ready" 2>/dev/null; then
  echo "$venv ready"; exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0   # pinned first: an unpinned torch would pull the multi-GB CUDA build
"${pip[@]}" "${packages[@]}"
"$venv/bin/python" -c "$ready" && echo "$venv ready"
