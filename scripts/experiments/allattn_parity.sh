#!/usr/bin/env bash
# All-attention with persistent memory vs dense attention + FFN at parameter parity
# (Sukhbaatar et al. 2019) at CPU scale: tiny-shakespeare, character level, d_model 128,
# 4 layers, 4 heads, seq 128, batch 16, STEPS steps (default 400), seeds 1 and 2.
#   dense:    attention + FFN (d_ff 512), learned absolute positions (configs/dense-shakespeare.toml)
#   allattn:  persistent memory N = 512 = d_ff (parity), no FFN, relative positions
#             (configs/allattn-shakespeare.toml)
# Then a comparison table and plots in docs/results/ (`report`). About 20 min on 2 cores.
#   scripts/experiments/allattn_parity.sh [CORPUS_FILE]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
experiment_setup allattn-parity "$@"
STEPS="${STEPS:-400}"
run() { # name, config, seed, extra sets...
  local name="$1" config="$2" seed="$3"; shift 3
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  "$BIN/train" --config "$config" --backend flex "${DATA[@]}" \
    --set train.steps="$STEPS" --set train.eval_every=100 --set train.checkpoint_every="$STEPS" \
    --set train.seed="$seed" --set "train.run_dir=\"$OUT/$name-s$seed\"" "${sets[@]}" \
    >"$OUT/$name-s$seed.log" 2>&1 || echo "run $name-s$seed failed: see $OUT/$name-s$seed.log" >&2
  grep -E "parameters|done at" "$OUT/$name-s$seed.log" >&2 || true
}
for seed in 1 2; do
  run dense configs/dense-shakespeare.toml "$seed"
  run allattn configs/allattn-shakespeare.toml "$seed"
done
# Only the runs that finished (a summary.json) go into the report.
"$BIN/report" $(dirname $(ls "$OUT"/*/summary.json) | sort) --out docs/results --name allattn-parity
