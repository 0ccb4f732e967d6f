#!/usr/bin/env bash
# Does sensq's default (rank -> plan) beat the fixed rules, and how close is it to the e2e plans?
# One model, as a user runs it: probe 16 prompts; rank with the default (grad-e2e, on the first 8 prompts),
# with mse and with leave-one-in e2e (first 4 prompts, the oracle); plans at 5/10/20% and ModelOpt's budget
# from e2e and mse; then one paired ablation (16 prompts x 2 seeds the probe did not run) of the default's
# budgets against none, the entrance, ModelOpt's recipe, first+last blocks, 3 random draws per budget and the
# plan files, among them sensq plan --search e2e at each budget. Resumes: every step is skipped when its output exists.
#
#   bash experiments/signals/run.sh tiny-deep-4step "--preset lightning-4step" OUT
#   bash experiments/signals/run.sh tiny-deep "--steps 8" OUT
set -euo pipefail
MODEL=$1; TRAJECTORY=$2; OUT=$3
SENSQ=${SENSQ:-sensq}
mkdir -p "$OUT"; cd "$OUT"
timed() { local name=$1; shift; [ -e "$name" ] && return 0; /usr/bin/time -f "$name %e s" -a -o times.txt "$@" > "$name.log" 2>&1; }
timed probe.h5 $SENSQ probe --model "$MODEL" $TRAJECTORY --limit 16 --out probe.h5
timed e2e.json $SENSQ rank probe.h5 --metric e2e --limit 4 --out e2e.json
timed grad.json $SENSQ rank probe.h5 --limit 8 --validate e2e.json --out grad.json
timed mse.json $SENSQ rank probe.h5 --metric mse --validate e2e.json --out mse.json
timed grad-step.json $SENSQ rank probe.h5 --metric grad-step --limit 8 --validate e2e.json --out grad-step.json
grep -h "proxy check" grad.json.log mse.json.log grad-step.json.log || true
for b in 5% 10% 20% 32.5%; do
  n=${b%\%}
  [ -e "e2e-$n.json" ] || $SENSQ plan e2e.json --budget "$b" --out "e2e-$n.json" > /dev/null
  [ -e "mse-$n.json" ] || $SENSQ plan mse.json --budget "$b" --out "mse-$n.json" > /dev/null
  timed "search-$n.json" $SENSQ plan grad.json --budget "$b" --search e2e --out "search-$n.json"
done
# the ablation resumes its own generations (a rerun only adds what is missing)
/usr/bin/time -f "ablation %e s" -a -o times.txt $SENSQ ablate grad.json --top-k "" --budget 5%,10%,20% --random 3 --seeds 2 \
  --plans e2e-5.json --plans e2e-10.json --plans e2e-20.json --plans e2e-32.5.json \
  --plans mse-10.json --plans mse-32.5.json \
  --plans search-5.json --plans search-10.json --plans search-20.json --plans search-32.5.json \
  --out ablation > ablation.log 2>&1
cat times.txt
