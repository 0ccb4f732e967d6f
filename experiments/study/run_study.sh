#!/usr/bin/env bash
# The method's study with sensq's commands: W4A4 (HiF4) with a protected entrance, calibrated on the
# few-step trajectory, scored against full precision at several step counts (Table III), plus what
# protection buys (ablation). One script, two ready configs:
#
#   experiments/study/run_study.sh experiments/study/tiny.env   # the embedded trained model: CPU, minutes
#   experiments/study/run_study.sh experiments/study/a14b.env   # real Wan2.2-T2V-A14B: GPU, weights (README.md)
#
# Every setting comes from the config; the environment overrides it (OUT=x LIMIT=4 run_study.sh CONFIG).
# Every step resumes: rerun the same command after an interruption.
set -euo pipefail
CONFIG=${1:?usage: run_study.sh CONFIG.env  (experiments/study/tiny.env or experiments/study/a14b.env)}
# shellcheck source=/dev/null
source "$CONFIG"
SENSQ=${SENSQ:-sensq}
mkdir -p "$OUT"
say() { printf '\n== %s\n' "$*"; }

# pre-flight: what the last steps need is checked before hours of GPU work
for NAME in OPENS2V LORA_HIGH LORA_LOW; do
  if [[ -n "${!NAME:-}" && ! -f "${!NAME}" ]]; then echo "run_study.sh: $NAME file not found: ${!NAME}" >&2; exit 1; fi
done
if [[ "${VBENCH:-0}" == 1 ]]; then
  $SENSQ eval --check-vbench --vbench-python "$VBENCH_PYTHON"
fi

# 0. the prompt set: an OpenS2V (or any) source filtered into one prompt file, else PROMPTS, else built-ins
if [[ -n "${OPENS2V:-}" ]]; then
  say "prompts: filter $OPENS2V"
  EXCLUDE=()
  [[ -n "${FILTER_EXCLUDE:-}" ]] && EXCLUDE=(--exclude "$FILTER_EXCLUDE")
  # shellcheck disable=SC2086
  $SENSQ prompts "$OPENS2V" $FILTER_ARGS "${EXCLUDE[@]}" --out "$OUT/prompts.json"
  PROMPTS="$OUT/prompts.json"
fi
PROMPT_ARGS=(--limit "$LIMIT")
[[ -n "${PROMPTS:-}" ]] && PROMPT_ARGS+=(--prompts "$PROMPTS")
LORA_ARGS=()
[[ -n "${LORA_HIGH:-}" ]] && LORA_ARGS+=(--lora-high "$LORA_HIGH")
[[ -n "${LORA_LOW:-}" ]] && LORA_ARGS+=(--lora-low "$LORA_LOW")

# 1. probe the deployed few-step trajectory (with LORA_HIGH/LORA_LOW: the student, LoRAs fused)
say "probe"
RESUME=()
[[ -f "$OUT/probe.h5" ]] && RESUME=(--resume)
# shellcheck disable=SC2086
$SENSQ probe --model "$MODEL" "${LORA_ARGS[@]}" $PROBE_ARGS "${PROMPT_ARGS[@]}" --limit "${PROBE_LIMIT:-$LIMIT}" \
    --tokens "$TOKENS" \
    --out "$OUT/probe.h5" "${RESUME[@]}"
# 2. rank each expert's layers (the probe's model and LoRAs, passed again: sensq never loads what a file names),
# the formats side by side; the plan; its report
# (files already there are kept: delete ranking.json to rank again, plan.json to plan again)
say "rank, plan, report"
[[ -f "$OUT/ranking.json" ]] || $SENSQ rank "$OUT/probe.h5" --model "$MODEL" "${LORA_ARGS[@]}" --format "$FORMATS" \
    --out "$OUT/ranking.json"
[[ -f "$OUT/plan.json" ]] || $SENSQ plan "$OUT/ranking.json" --budget "$BUDGET" --out "$OUT/plan.json"
# drawn again only when the ranking or the plan is newer than it (a resumed study keeps it)
REPORT="$OUT/ranking-report/report.html"
[[ "$REPORT" -nt "$OUT/ranking.json" && "$REPORT" -nt "$OUT/plan.json" ]] ||
  $SENSQ report "$OUT/ranking.json" --plan "$OUT/plan.json" --out "$OUT/ranking-report"
# 3. quantize by the plan, calibrated block by block on the probe; a packed checkpoint
say "apply-plan"  # (an existing checkpoint is kept: delete quantized/ to quantize again)
if [[ ! -f "$OUT/quantized/manifest.json" ]]; then
  # shellcheck disable=SC2086
  $SENSQ apply-plan "$OUT/plan.json" --model "$MODEL" "${LORA_ARGS[@]}" --probe "$OUT/probe.h5" $APPLY_ARGS \
      --out "$OUT/quantized"
fi
# 4. Table III: the original sampler (ORIGINAL_ARGS) vs same-step full precision vs quantized, per step count
VB=()
[[ "${VBENCH:-0}" == 1 ]] && VB=(--vbench --vbench-python "$VBENCH_PYTHON" --vbench-device "$VBENCH_DEVICE")
say "generate + eval: original"
# shellcheck disable=SC2086
$SENSQ generate --model "$MODEL" $ORIGINAL_ARGS "${PROMPT_ARGS[@]}" --label original --out "$OUT/runs/original"
$SENSQ eval "$OUT/runs/original" "${VB[@]}"
for STEP in $STEPS; do
  say "generate + eval: $STEP steps"
  # shellcheck disable=SC2086
  $SENSQ generate --model "$MODEL" "${LORA_ARGS[@]}" $GEN_ARGS --steps "$STEP" "${PROMPT_ARGS[@]}" \
      --label "fp-$STEP" --out "$OUT/runs/fp-$STEP"
  # shellcheck disable=SC2086
  $SENSQ generate --model "$OUT/quantized" $GEN_ARGS --steps "$STEP" "${PROMPT_ARGS[@]}" \
      --label "quantized-$STEP" --out "$OUT/runs/quantized-$STEP"
  $SENSQ eval "$OUT/runs/fp-$STEP" "${VB[@]}"
  $SENSQ eval "$OUT/runs/quantized-$STEP" --reference "$OUT/runs/fp-$STEP" "${VB[@]}"
done
# 5. what protection buys: none, entrance, entrance + top-k, budgets, one expert only, ModelOpt's set, random sets;
# every set deployed as apply-plan deployed the checkpoint (APPLY_ARGS' calibration), over prompts x seeds
say "ablate"
CALIBRATE=(--calibrate none)
[[ "$APPLY_ARGS" == *"--calibrate mse"* ]] && CALIBRATE=(--calibrate mse --probe "$OUT/probe.h5")
# shellcheck disable=SC2086
$SENSQ ablate "$OUT/ranking.json" --model "$MODEL" "${LORA_ARGS[@]}" "${PROMPT_ARGS[@]}" "${CALIBRATE[@]}" \
    $ABLATE_ARGS --out "$OUT/ablation"
# 6. the table
say "table"
"${PYTHON:-python3}" "$(dirname "$0")/table.py" "$OUT"
