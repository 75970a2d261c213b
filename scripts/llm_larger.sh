#!/bin/bash
# The grid of docs/llm-larger.md: the rows that matter on the translations task at its larger
# size (configs/translations-64.toml), on two language sets and two seeds, then its tables.
# Resumable: run it again after an interruption; finished runs are kept, and a run cut short
# resumes from its last checkpoint (every 2 rounds). At the end the finished runs' records go
# to docs/results/llm-larger and the tables are printed from there.
#
#   bash scripts/llm_larger.sh [OUT]          # OUT defaults to results/llm-larger
#
# The two language sets run side by side, one run each at a time (one thread per run).
set -euo pipefail
OUT=${1:-results/llm-larger}
CONFIG=configs/translations-64.toml
KEPT=docs/results/llm-larger
# The runs whose records are kept in the repository count as finished (their config.toml and
# summary.json are what a sweep checks), so a fresh clone continues the grid where they end.
if [ -d "$KEPT" ] && [ "$(realpath -m "$OUT")" != "$(realpath -m "$KEPT")" ]; then
  mkdir -p "$OUT" && cp -rn "$KEPT"/. "$OUT"/
fi
METHODS="floral-oracle:train_base=false,fedit,floral-seeded:train_base=false,floral"
METHODS+=",local-adaptor:train_base=false,fedsa-lora"
# FDLoRA scores its fusion candidates on 16 names, 4 candidates a step (the defaults, 64 and 8,
# would make its run five times FedIT's); the current weights stay among the candidates.
METHODS+=",fdlora:fusion_samples=16:fusion_candidates=4"
COMMON=(--methods "$METHODS" --jobs 1 --checkpoint-every 2 --no-plots --quiet)
# Seed 0 of every row first, then seed 1: a grid cut short still has whole settings.
for SEED in 0 1; do
  floral sweep "$CONFIG" "${COMMON[@]}" --seeds "$SEED" --out "$OUT/de-fr-es-it" &
  floral sweep "$CONFIG" "${COMMON[@]}" --seeds "$SEED" --out "$OUT/pt-pl-cs-tr" \
    --set 'task.languages=["pt", "pl", "cs", "tr"]' &
  wait
done
python scripts/llm_larger.py "$OUT" --keep "$KEPT" --figures docs
