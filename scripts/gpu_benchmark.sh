#!/usr/bin/env bash
# The GPU figures of docs/performance.md, sized for one 15-minute device session. Each report is
# rewritten as every row finishes, so a run cut short keeps what it measured.
#
#   OUT=results bash scripts/gpu_benchmark.sh [vitb|vitl|cudagraphs|all]   (default: vitb then vitl)
#
#   vitb        ViT-B/16 MAE at batch 256 and SimMIM at batch 128 (the batches of the issue's reference table):
#               transformers and histomim eager and compiled, histomim without SDPA / without fused AdamW,
#               histomim float8 compiled (needs torchao; 6 compiles, ~6 min)
#   vitl        ViT-L/16 MAE at batch 256, eager: peak memory of both implementations (~1 min)
#   cudagraphs  ViT-B/16 MAE with torch.compile(mode="reduce-overhead") (2 compiles, ~2 min)
#
# EXTRA_ARGS is appended to every benchmark command (the last value of a flag wins), e.g. a CPU rehearsal:
#   EXTRA_ARGS="--device cpu --preset histomim-vit-tiny16 --image-size 64 --batch-size 4 --steps 1 --compile none" \
#       bash scripts/gpu_benchmark.sh vitb
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmark-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
part=${1:-default}
read -r -a extra <<< "${EXTRA_ARGS:-}"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
} > "$out/environment.txt"

bench() {  # bench NAME ARGS...: one benchmark run, its JSON and log under $out
    local name=$1
    shift
    echo "== $name: python3 scripts/benchmark.py $* ${extra[*]}"
    python3 scripts/benchmark.py "$@" "${extra[@]}" --json "$out/$name.json" --plot "$out/$name.png" 2>&1 |
        tee "$out/$name.log"
}

case $part in
    vitb | default | all)
        bench vitb-mae --preset histomim-vitb16 --objectives mae --batch-size 256 --compile none default --ablations --float8
        bench vitb-simmim --preset histomim-vitb16 --objectives simmim --batch-size 128 --compile none default --ablations --float8 ;;&
    vitl | default | all)
        bench vitl --preset histomim-vitl16 --batch-size 256 --objectives mae --steps 3 --warmup 1 ;;&
    cudagraphs | all)
        bench cudagraphs --preset histomim-vitb16 --batch-size 256 --objectives mae --compile reduce-overhead ;;&
    vitb | vitl | cudagraphs | default | all) ;;
    *)
        echo "unknown part '$part': choose vitb, vitl, cudagraphs or all" >&2
        exit 2 ;;
esac
