#!/usr/bin/env bash
# Everything that needs a GPU, in one run on a CUDA machine (no network needed), each stage time-boxed:
#   1. bench/gpu_check.py: training and composition correct under bf16 autocast at SD1.5 scale, and the
#      speed ratios there;
#   2. bench/comfy_cuda_check.py: a concept trained inside ComfyUI on CUDA against ComfyUI's own trainer
#      (needs a ComfyUI checkout in $COMFYUI_PATH);
#   3. bench/quality.py on CUDA: the toy-world grid, one process per method and seed, in parallel.
# Python packages the machine lacks can be put beside as wheels in $WHEELS (installed with --no-deps into a
# folder of their own). Results go to $OUT (default bench/results/gpu) as logs and one results.tar.gz.
#
#     OUT=/tmp/gpu WHEELS=wheels/ COMFYUI_PATH=/path/to/ComfyUI bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
t0=$SECONDS
log() { echo "[gpu_run $((SECONDS - t0))s] $*"; }
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target .gpu_site "$WHEELS"/*.whl 2>&1 | tail -n 2
  export PYTHONPATH="$PWD/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

log "1. CUDA checks and SD1.5-scale speed"
(cd bench && timeout "${CHECK_S:-240}" python3 gpu_check.py --out "../$OUT") >"$OUT/gpu_check.log" 2>&1
log "gpu_check exit $?"; tail -n 30 "$OUT/gpu_check.log"

if [ -n "${COMFYUI_PATH:-}" ] && [ -f bench/comfy_cuda_check.py ]; then
  log "2. ComfyUI on CUDA"
  timeout "${COMFY_S:-200}" python3 bench/comfy_cuda_check.py --comfyui "$COMFYUI_PATH" --out "$OUT" >"$OUT/comfy_cuda_check.log" 2>&1
  log "comfy_cuda_check exit $?"; tail -n 20 "$OUT/comfy_cuda_check.log"
fi

log "3. toy quality grid on CUDA (${BENCH_S:-240} s budget)"
pids=()
for method in ${METHODS:-seqlora seqlora_v1 frozen_a lora sequential ortho_frozen joint fusion}; do
  for seed in ${SEEDS:-0 1}; do
    n=${N_SEED0:-4,8,16,32}; [ "$seed" != 0 ] && n=${N_OTHER:-4,8,16}
    (cd bench && timeout "${BENCH_S:-240}" python3 quality.py --device cuda --threads 1 --methods "$method" \
      --seeds "$seed" --n "$n" --tag "quality_gpu_${method}_s${seed}") >"$OUT/quality_${method}_s${seed}.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p"; done
log "quality runs ended"
grep -h "^N=" "$OUT"/quality_*.log | sort | head -n 80
tar -czf "$OUT/results.tar.gz" bench/results/quality_gpu_* bench/results/gpu_check_cuda.json "$OUT"/*.log "$OUT"/*.txt \
  2>/dev/null
rm -f "$OUT"/quality_*.log
log "done: $(ls "$OUT")"
