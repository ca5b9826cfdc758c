#!/usr/bin/env bash
# Mixlab (flex) vs PyTorch (CPU) training throughput, same models, sizes and machine, in one
# run: one markdown row per workload with both tokens/s and the ratio Mixlab / PyTorch.
#
#   scripts/compare_torch.sh [PYTHON]      # PYTHON: a python with torch (default: python3)
#
# Install a CPU PyTorch as ../shared/PYTORCH-CPU.md describes (a venv outside the repo), e.g.
#   scripts/compare_torch.sh /tmp/torch-venv/bin/python
# Both sides use 2 threads / the 2 cores, random tokens, AdamW, global-norm clipping, median of
# the timed steps after one warm-up step. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
STEPS="${STEPS:-5}"
cargo build --release --bin bench >&2
BENCH=target/release/bench
[ -n "${CARGO_TARGET_DIR:-}" ] && BENCH="$CARGO_TARGET_DIR/release/bench"

tps() { "$PY" -c 'import json,sys; print(round(json.loads(sys.stdin.read().strip().splitlines()[-1])["tokens_per_s"]))'; }

row() { # name, torch args, mixlab --set args...
  local name="$1" targs="$2"; shift 2
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  local m t
  m=$("$BENCH" train --config configs/bench-small.toml --backend flex --steps "$STEPS" --warmup 1 "${sets[@]}" 2>/dev/null | tps)
  # shellcheck disable=SC2086
  t=$("$PY" scripts/torch_reference.py $targs --steps "$STEPS" --warmup 1 --threads 2 | tps)
  "$PY" -c "print(f'| $name | {$m:,} | {$t:,} | {$m / $t:.2f} |')"
}

echo "| workload (small: vocab 256, d 256, 4 layers, 4 heads, d_ff 1024) | Mixlab flex tokens/s | PyTorch tokens/s | Mixlab / PyTorch |"
echo "|---|---|---|---|"
row "dense causal, seq 256, batch 16" "--mixer dense"
row "FNet (FFT), seq 256, batch 16" "--mixer fourier --causal 0" \
  'model.mixer={kind="fourier",implementation="fft"}' 'train.objective="masked"'
row "FNet (FFT), seq 512, batch 16" "--mixer fourier --causal 0 --seq 512" \
  'model.mixer={kind="fourier",implementation="fft"}' 'train.objective="masked"' 'model.seq_len=512'
row "all-attention N=1024, no FFN, seq 256, batch 16" "--mixer persistent --n-persistent 1024" \
  'model.mixer={kind="persistent",n_heads=4,n_persistent=1024}' 'model.d_ff=0'
row "dense causal, seq 4096, batch 1" "--mixer dense --seq 4096 --batch 1" \
  'model.seq_len=4096' 'train.batch_size=1'
row "sparse window 3 x 64 vs masked dense, seq 4096, batch 1" "--mixer sparse-window --seq 4096 --batch 1 --block 64 --width 3" \
  'model.seq_len=4096' 'train.batch_size=1' 'model.mixer={kind="sparse",n_heads=4,block=64,pattern=[{kind="window",width=3}]}'
row "sparse strided 6 x 64 vs masked dense, seq 4096, batch 1" "--mixer sparse-strided --seq 4096 --batch 1 --block 64 --stride 6" \
  'model.seq_len=4096' 'train.batch_size=1' 'model.mixer={kind="sparse",n_heads=4,block=64,pattern=[{kind="strided",stride=6}]}'
