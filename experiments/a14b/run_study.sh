#!/usr/bin/env bash
# The method's study on real Wan2.2-T2V-A14B: W4A4 HiF4 with a protected entrance, calibrated on the
# few-step trajectory, scored with VBench (5 dimensions) and fidelity against full precision.
# Needs: the model in a local folder (or the HF cache), one 80 GB GPU, VBench weights (see README.md).
# Every step resumes: rerun the script after an interruption.
set -euo pipefail
MODEL=${MODEL:-./Wan2.2-T2V-A14B-Diffusers}      # local diffusers folder (sensq never downloads)
PROMPTS=${PROMPTS:-prompts.txt}                  # one prompt per line (VBench lists, OpenS2V records work too)
OUT=${OUT:-a14b-study}
LIMIT=${LIMIT:-32}
VBENCH_PYTHON=${VBENCH_PYTHON:-$HOME/vbench-env/bin/python}
mkdir -p "$OUT"

# 1. probe the deployed trajectory (the Lightning 4-step student: fuse its LoRAs first)
sensq probe --model "$MODEL" --prompts "$PROMPTS" --limit "$LIMIT" --preset lightning-4step --tokens 32 \
    ${LORA_HIGH:+--lora-high "$LORA_HIGH"} ${LORA_LOW:+--lora-low "$LORA_LOW"} --out "$OUT/probe.h5" --resume
# 2. rank per expert, formats side by side; then the plan
sensq rank "$OUT/probe.h5" --format hif4,mxfp4,nvfp4,int4 --out "$OUT/ranking.json"
sensq plan "$OUT/ranking.json" --budget 5% --out "$OUT/plan.json"
sensq report "$OUT/ranking.json" --plan "$OUT/plan.json" --out "$OUT/ranking-report"
# 3. quantize, calibrated block by block, one block on the GPU at a time
sensq apply-plan "$OUT/plan.json" --model "$MODEL" --probe "$OUT/probe.h5" --calibrate mse --sequential-experts \
    --offload --backend triton --out "$OUT/quantized"
# 4. Table III: original (40-step teacher) vs same-step full precision vs quantized, for 4/8/20/40 steps
sensq generate --model "$MODEL" --prompts "$PROMPTS" --limit "$LIMIT" --preset wan22-40step --out "$OUT/runs/original"
for STEPS in 4 8 20 40; do
  sensq generate --model "$MODEL" --prompts "$PROMPTS" --limit "$LIMIT" --preset wan22-40step --steps "$STEPS" \
      --out "$OUT/runs/fp-$STEPS"
  sensq generate --model "$OUT/quantized" --prompts "$PROMPTS" --limit "$LIMIT" --preset wan22-40step \
      --steps "$STEPS" --out "$OUT/runs/hif4-$STEPS"
  sensq eval "$OUT/runs/hif4-$STEPS" --reference "$OUT/runs/fp-$STEPS" --vbench --vbench-python "$VBENCH_PYTHON" \
      --vbench-device cuda
  sensq eval "$OUT/runs/fp-$STEPS" --reference "$OUT/runs/fp-$STEPS" --vbench --vbench-python "$VBENCH_PYTHON" \
      --vbench-device cuda
done
sensq eval "$OUT/runs/original" --reference "$OUT/runs/original" --vbench --vbench-python "$VBENCH_PYTHON" \
    --vbench-device cuda
# 5. what protection buys
sensq ablate "$OUT/ranking.json" --model "$MODEL" --prompts "$PROMPTS" --limit 8 --top-k 4,16,32 \
    --budget 5%,10% --out "$OUT/ablation"
