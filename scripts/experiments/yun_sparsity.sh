#!/usr/bin/env bash
# Yun et al. (2020) at CPU scale on a character corpus: quality against sparsity for the
# patterns STRIDED, FIXED, STAR, RANDOM and WINDOW (causal, blocks of 16 tokens, seq 256 = 16
# blocks; 2 sparsity levels each, star has one) and dense attention as the reference.
# tiny-shakespeare, character level, d_model 128, 4 layers, 4 heads, d_ff 512, batch 16,
# STEPS steps (default 150), seed 1337. Then a table (best valid bpc, density, keys per token)
# and plots including quality vs density in docs/results/ (`report`). About 35 min on 2 cores.
#   scripts/experiments/yun_sparsity.sh [CORPUS_FILE]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
experiment_setup yun-sparsity "$@"
STEPS="${STEPS:-150}"
run() { # name, mixer table
  "$BIN/train" --config configs/dense-shakespeare.toml --backend flex "${DATA[@]}" \
    --set model.seq_len=256 --set train.steps="$STEPS" --set train.eval_every=50 \
    --set train.checkpoint_every="$STEPS" --set "train.run_dir=\"$OUT/$1\"" \
    --set "model.mixer=$2" >"$OUT/$1.log" 2>&1 || echo "run $1 failed: see $OUT/$1.log" >&2
  grep -E "reach|done at" "$OUT/$1.log" >&2 || true
}
sparse() { echo "{kind=\"sparse\",n_heads=4,block=16,pattern=[$1]}"; }
run dense '{kind="dense",n_heads=4}'
for k in 2 4; do
  run "window-$k" "$(sparse "{kind=\"window\",width=$k}")"
  run "strided-$k" "$(sparse "{kind=\"strided\",stride=$k}")"
  run "fixed-$k" "$(sparse "{kind=\"fixed\",stride=$k,summary=1}")"
  run "random-$k" "$(sparse "{kind=\"random\",per_row=$k,seed=1}")"
done
run star "$(sparse '{kind="star",relays=1}')"
# Only the runs that finished (a summary.json) go into the report.
"$BIN/report" $(dirname $(ls "$OUT"/*/summary.json) | sort) --out docs/results --name yun-sparsity
