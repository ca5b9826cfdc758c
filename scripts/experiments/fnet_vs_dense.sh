#!/usr/bin/env bash
# FNet vs dense attention at CPU scale (Lee-Thorp et al. 2021: FNet trades some accuracy for
# speed): tiny-shakespeare, character level, seq 256, d_model 128, 4 layers, d_ff 512, batch 16,
# 300 steps, seed 1337; masked LM (the paper's setting) and causal LM (our causal FNet), then a
# comparison table and plots in docs/results/ (`report`). About 15 min on 2 cores.
#   scripts/experiments/fnet_vs_dense.sh [CORPUS_FILE]
# CORPUS_FILE defaults to ../shared/datasets/tinyshakespeare/input.txt when present, else the
# named corpus is downloaded into datasets/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin train --bin report >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
CORPUS="${1:-../shared/datasets/tinyshakespeare/input.txt}"
DATA=()
[ -f "$CORPUS" ] && DATA=(--set "data.path=\"$CORPUS\"")
OUT=runs/fnet-vs-dense
rm -rf "$OUT"
run() { # name, objective, mixer table
  "$BIN/train" --config configs/dense-shakespeare.toml --backend flex "${DATA[@]}" \
    --set model.seq_len=256 --set train.steps=300 --set train.eval_every=50 \
    --set train.checkpoint_every=300 --set "train.objective=\"$2\"" \
    --set "train.run_dir=\"$OUT/$1\"" --set "model.mixer=$3" 2>&1 | grep -E "done at" >&2
}
run dense-mlm masked '{kind="dense",n_heads=4,causal=false}'
run fnet-mlm masked '{kind="fourier"}'
run dense-causal causal '{kind="dense",n_heads=4}'
run fnet-causal causal '{kind="fourier",causal=true}'
"$BIN/report" "$OUT"/dense-mlm "$OUT"/fnet-mlm "$OUT"/dense-causal "$OUT"/fnet-causal \
  --out docs/results --name fnet-vs-dense
