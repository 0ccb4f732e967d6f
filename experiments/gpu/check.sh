#!/usr/bin/env bash
# The prepared GPU check (issue 16). On a lent H100/H200, from the repository root, in under 8 minutes:
#   device run: bash experiments/gpu/check.sh      (carry: [".gpu-wheels"], made by experiments/gpu/prepare.sh)
# Writes $OUT/gpu-check.md (the table for docs/performance.md, naming the card) and the raw files beside it.
# Each step has its own time limit; a failed step is recorded and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
REPORT="$OUT/gpu-check.md"
: > "$REPORT"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "| $name | rc $rc | $((SECONDS - start)) s |" >> "$OUT/steps.md"
    return 0
}
# nothing can be fetched there: the carried wheels, then sensq itself, offline, over the image's torch/triton
[ -d .gpu-wheels ] && $PY -m pip install --no-index --no-deps --quiet .gpu-wheels/*.whl > "$OUT/install.log" 2>&1
$PY -m pip install --no-index --no-deps --no-build-isolation --quiet -e . >> "$OUT/install.log" 2>&1
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/card: /'
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    echo
} >> "$REPORT"
echo "| step | result | time |" > "$OUT/steps.md"
echo "|---|---|---|" >> "$OUT/steps.md"
# 1. every gpu-marked test (bit-exactness of the Triton kernels on the card, deployed layers on CUDA)
step gpu-tests 150 $PY -m pytest -q -m gpu -o addopts="" tests -p no:cacheprovider
# 2. fused quantize bandwidth and the W4A4 linear vs cuBLAS BF16 at M=32760
step bench 180 $PY -m pytest -q -o addopts="" tests/benchmarks/test_bench_triton.py --benchmark-only \
    --benchmark-json="$OUT/triton.json" -p no:cacheprovider
# 3. resident memory and peak torch.cuda.max_memory_allocated of an A14B-width model, FP vs deployed
step memory 90 $PY experiments/deploy_memory.py --out "$OUT" --only cuda --blocks 2
# 4. the CLI chain on CUDA: probe -> rank -> plan -> apply-plan -> generate (embedded tiny-deep, bf16)
S="$PY -m sensq.cli"
step cli 120 bash -c "set -e; $S probe --model tiny-deep --device cuda --limit 2 --steps 4 --out $OUT/w/probe.h5 \
 && $S rank $OUT/w/probe.h5 --device cuda --out $OUT/w/ranking.json \
 && $S plan $OUT/w/ranking.json --budget 10% --out $OUT/w/plan.json \
 && $S apply-plan $OUT/w/plan.json --model tiny-deep --device cuda --probe $OUT/w/probe.h5 --calibrate mse \
      --out $OUT/w/ckpt \
 && $S generate --model $OUT/w/ckpt --device cuda --limit 2 --steps 4 --no-video --out $OUT/w/gen"
# 5. GPTQ per layer at A14B's three shapes on the card (4096 calibration rows)
step gptq 120 $PY experiments/gptq_speed.py --device cuda --shapes 5120x5120,13824x5120,5120x13824
{
    echo "## Steps"; echo; cat "$OUT/steps.md"; echo
    echo "## gpu-marked tests"; echo; tail -3 "$OUT/gpu-tests.log"; echo
    echo "## Triton benchmarks"; echo
    [ -f "$OUT/triton.json" ] && $PY experiments/bench_table.py "$OUT/triton.json"
    echo; echo "## Memory (experiments/deploy_memory.py --only cuda)"; echo
    [ -f "$OUT/results.json" ] && $PY -c "import json; print(json.dumps(json.load(open('$OUT/results.json')).get('cuda'), indent=1))"
    echo; echo "## CLI on CUDA"; echo; tail -5 "$OUT/cli.log"
    echo; echo "## GPTQ per layer (experiments/gptq_speed.py)"; echo; cat "$OUT/gptq.log"
} >> "$REPORT"
cat "$REPORT"
