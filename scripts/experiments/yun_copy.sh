#!/usr/bin/env bash
# Yun et al. (2020) at CPU scale: which sparse patterns learn the copy task with 4 layers?
# configs/copy-sparse.toml (rows of 64 symbols + separator + copy, blocks of 8 tokens, so the
# answer sits exactly 8 blocks back), 300 steps, seed 1337, one run per pattern plus dense;
# then a comparison table and plots in docs/results/ (`report`). About 15 min on 2 cores.
#   scripts/experiments/yun_copy.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin train --bin report >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
OUT=runs/yun-copy
rm -rf "$OUT"
run() { # name, mixer table
  "$BIN/train" --config configs/copy-sparse.toml --backend flex \
    --set model.n_layers=4 --set train.steps=300 --set train.checkpoint_every=300 \
    --set "train.run_dir=\"$OUT/$1\"" --set "model.mixer=$2" 2>&1 | grep -E "reach|done at" >&2
}
sparse() { echo "{kind=\"sparse\",n_heads=4,block=8,pattern=[$1]}"; }
run dense '{kind="dense",n_heads=4}'
run strided "$(sparse '{kind="strided",stride=4}')"
run fixed "$(sparse '{kind="fixed",stride=4,summary=1}')"
run star "$(sparse '{kind="star",relays=1}')"
run random "$(sparse '{kind="random",per_row=3,seed=1}')"
run window "$(sparse '{kind="window",width=3}')"
"$BIN/report" "$OUT"/dense "$OUT"/strided "$OUT"/fixed "$OUT"/star "$OUT"/random "$OUT"/window \
  --out docs/results --name yun-copy
