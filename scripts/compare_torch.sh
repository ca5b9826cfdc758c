#!/usr/bin/env bash
# Mixlab (flex) vs PyTorch (CPU) training throughput, same models, sizes and machine, in one
# run: one JSON line per workload (workload, mixlab_tokens_per_s, torch_tokens_per_s, ratio)
# and a markdown table of the same numbers.
#
#   scripts/compare_torch.sh [PYTHON]      # PYTHON: a python with torch (default: python3)
#
# Install a CPU PyTorch as ../shared/PYTORCH-CPU.md describes (a venv outside the repo), e.g.
#   scripts/compare_torch.sh /tmp/torch-venv/bin/python
# Both sides use 2 threads / the 2 cores, random tokens, AdamW, global-norm clipping, median of
# STEPS (default 8) timed steps after one warm-up step; ROUNDS=N (default 1) alternates N runs
# of each side per row and reports the median of each side (this machine drifts ±15% between
# runs: ROUNDS=3 gives figures to trust, at three times the time). COMPOSED=1 also times Mixlab with
# model.attention_impl = "composed" (the tensor-op attention, the pre-kernel baseline) in the
# same run. OUT (default runs/compare-torch) receives results.jsonl and table.md.
# Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
STEPS="${STEPS:-8}"
ROUNDS="${ROUNDS:-1}"
OUT="${OUT:-runs/compare-torch}"
mkdir -p "$OUT"
cargo build --release --bin bench >&2
BENCH=target/release/bench
[ -n "${CARGO_TARGET_DIR:-}" ] && BENCH="$CARGO_TARGET_DIR/release/bench"
: > "$OUT/results.jsonl"

tps() { "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["tokens_per_s"])'; }

mixlab() { # --set args...
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  "$BENCH" train --config configs/bench-small.toml --backend flex --steps "$STEPS" --warmup 1 \
    "${sets[@]}" 2>/dev/null | tps
}

median() { "$PY" -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

row() { # name, torch args, mixlab --set args...
  local name="$1" targs="$2"; shift 2
  local m t c=null ms=() ts=() cs=()
  # ROUNDS alternating runs of each side (the machine's speed drifts between runs); each
  # side's figure is the median over the rounds of its per-run medians.
  for _ in $(seq "$ROUNDS"); do
    ms+=("$(mixlab "$@")")
    if [ "${COMPOSED:-0}" = 1 ]; then cs+=("$(mixlab "$@" 'model.attention_impl="composed"')"); fi
    # shellcheck disable=SC2086
    ts+=("$("$PY" scripts/torch_reference.py $targs --steps "$STEPS" --warmup 1 --threads 2 | tps)")
  done
  m=$(median "${ms[@]}")
  t=$(median "${ts[@]}")
  if [ "${COMPOSED:-0}" = 1 ]; then c=$(median "${cs[@]}"); fi
  "$PY" -c "import json; print(json.dumps({'workload': '$name', 'mixlab_tokens_per_s': round($m), \
'torch_tokens_per_s': round($t), 'ratio': round($m / $t, 3), \
'mixlab_composed_tokens_per_s': None if '$c' == 'null' else round($c), 'rounds': $ROUNDS}))" | tee -a "$OUT/results.jsonl"
}

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
row "tiny char model (vocab 65, d 128, 4 layers, d_ff 512, seq 64, batch 12)" \
  "--mixer dense --vocab 65 --d-model 128 --d-ff 512 --seq 64 --batch 12" \
  'model.vocab_size=65' 'model.d_model=128' 'model.d_ff=512' 'model.seq_len=64' 'train.batch_size=12'

"$PY" - "$OUT/results.jsonl" > "$OUT/table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
composed = any(r["mixlab_composed_tokens_per_s"] for r in rows)
head = "| workload (small: vocab 256, d 256, 4 layers, 4 heads, d_ff 1024 unless said) | Mixlab flex tokens/s |"
if composed:
    head += " Mixlab composed attention tokens/s |"
print(head + " PyTorch tokens/s | Mixlab / PyTorch |")
print("|---|---|" + ("---|" if composed else "") + "---|---|")
for r in rows:
    line = f"| {r['workload']} | {r['mixlab_tokens_per_s']:,} |"
    if composed:
        c = r["mixlab_composed_tokens_per_s"]
        line += f" {c:,} |" if c else " - |"
    print(line + f" {r['torch_tokens_per_s']:,} | {r['ratio']:.2f} |")
EOF
cat "$OUT/table.md"
