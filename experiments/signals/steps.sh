#!/usr/bin/env bash
# Do step-range plans from the default grad-e2e ranking help? On tiny-deep-4step (lightning: steps 0-1 run the
# high-noise expert, 2-3 the low-noise one): plans at 10% and 20% of every step against 20% and 40% kept at the
# last step or at steps 2-3 only (chosen by the ranking's per-step values), one paired ablation, 16 prompts x 2
# seeds the ranking did not use. Resumes.
#
#   bash experiments/signals/steps.sh OUT
set -euo pipefail
OUT=$1; SENSQ=${SENSQ:-sensq}
mkdir -p "$OUT"; cd "$OUT"
[ -e probe.h5 ] || $SENSQ probe --model tiny-deep-4step --preset lightning-4step --limit 16 --out probe.h5 > probe.log
[ -e grad.json ] || $SENSQ rank probe.h5 --limit 8 --out grad.json > grad.log
plans=()
for spec in "10 all" "20 all" "20 last" "20 2-3" "40 last" "40 2-3"; do
  set -- $spec; f=plan-$1-$2.json
  if [ "$2" = all ]; then range=(); else range=(--protect-steps "$2"); fi
  [ -e "$f" ] || $SENSQ plan grad.json --budget "$1%" "${range[@]}" --out "$f" > /dev/null
  plans+=(--plans "$f")
done
$SENSQ ablate grad.json "${plans[@]}" --only-plans --seeds 2 --out ablation
