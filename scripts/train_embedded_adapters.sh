#!/usr/bin/env bash
# Rebuild the embedded adapters: domain data from the pinned source commits, LoRA training, held-out perplexity.
# Usage: scripts/train_embedded_adapters.sh            (clones the sources into .build/sources)
#        MEDICAL_REPO=dir CODE_REPO=dir GENERAL_REPO=dir scripts/train_embedded_adapters.sh   (existing clones)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE=${BASE:-.build/smollm2-135m-instruct}
DATA=${DATA:-.build/adapter-data}
OUT=${OUT:-deployments/models/smollm2_adapters}

"$PY" -m deployments.cli models embedded "$BASE"
"$PY" -m deployments.models.domain_data "$DATA" --train 64 --heldout 20 --sources .build/sources \
  ${MEDICAL_REPO:+--medical-repo "$MEDICAL_REPO"} ${CODE_REPO:+--code-repo "$CODE_REPO"} \
  ${GENERAL_REPO:+--general-repo "$GENERAL_REPO"}
# One thread each and both at once: on a small shared CPU two single-threaded runs finish sooner than two in turn.
for domain in medical code; do
  OMP_NUM_THREADS=1 nice -n 10 "$PY" -m deployments.cli adapter train --base "$BASE" \
    --data "$DATA/$domain.train.jsonl" --out "$OUT/$domain" \
    --rank 8 --alpha 16 --lr 2e-3 --epochs 1 --batch-size 4 --max-length 160 \
    --target-modules q_proj v_proj o_proj up_proj down_proj --save-dtype bfloat16 > "$DATA/$domain.train.log" 2>&1 &
done
wait
rm -f "$OUT"/medical/README.md "$OUT"/code/README.md  # peft's empty model-card template; DATA.md is the card
nice -n 10 "$PY" -m deployments.cli adapter eval --base "$BASE" \
  --adapter medical="$OUT/medical" --adapter code="$OUT/code" \
  --data medical="$DATA/medical.heldout.jsonl" --data code="$DATA/code.heldout.jsonl" \
  --data general="$DATA/general.heldout.jsonl" --max-length 160 --json "$OUT/perplexity.json"
