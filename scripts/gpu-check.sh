#!/usr/bin/env bash
# The GPU check of issue #9, as one script: backend parity (wgpu vs flex, every mixer family),
# the `base` workload (configs/bench-base.toml) for STEPS steps with dense, FNet, sparse and
# all-attention on wgpu (tokens/s, peak GPU memory, achieved GFLOP/s), the same models with the
# PyTorch reference on CUDA when a torch with CUDA is there, the attention operation alone
# (bench attention: fused kernels vs composed ops, TFLOP/s), and GPU memory over MEM_STEPS
# training steps (burn#5212 / #4792 watch). Prints a markdown table; JSON lines go to OUT_DIR.
#
#   scripts/gpu-check.sh                      # on a GPU machine, binaries in target/release
#   SMOKE=1 scripts/gpu-check.sh              # tiny sizes: runs end to end on lavapipe (CPU)
#   scripts/gpu-check.sh --dry-run            # every row's model validated and built at full
#                                             # size, nothing trained (CI runs it; see below)
#
# The device machine has no Rust toolchain: `scripts/gpu-bundle.sh` builds `bench` here and
# packs it (stripped, gzipped) into .gpu/, which a device run carries (docs/BENCHMARKS.md).
# Environment: MIXLAB_BIN (folder with bench; default target/release or
# $CARGO_TARGET_DIR/release), OUT_DIR (default $OUT, else runs/gpu-check), STEPS (200),
# MEM_STEPS (1000), PYTHON (python3), BACKEND (wgpu).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${MIXLAB_BIN:-${CARGO_TARGET_DIR:-target}/release}"
OUT_DIR="${OUT_DIR:-${OUT:-runs/gpu-check}}"
BACKEND="${BACKEND:-wgpu}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-200}"
MEM_STEPS="${MEM_STEPS:-1000}"
WARMUP=5
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
JSONL="$OUT_DIR/gpu-check.jsonl"
status=0

# Sizes: the base workload, or (SMOKE=1) a tiny one that a software rasteriser finishes.
SIZE=()
TORCH_SIZE=(--vocab 256 --d-model 768 --layers 12 --heads 12 --d-ff 3072 --seq 1024 --batch 8)
HEADS=12 BLOCK=64
# The attention operation alone (bench attention): lengths, batch rows, head width.
ATTN=(--n 1024,4096,16384 --batch 1 --d-head 64)
if [ "${SMOKE:-0}" = 1 ]; then
  STEPS=2 MEM_STEPS=20 WARMUP=1 HEADS=2 BLOCK=16
  ATTN=(--n 64,128 --batch 1 --d-head 16 --repeats 1)
  SIZE=(--set model.d_model=32 --set model.n_layers=1 --set model.d_ff=64 --set model.seq_len=64
        --set train.batch_size=2)
  TORCH_SIZE=(--vocab 256 --d-model 32 --layers 1 --heads 2 --d-ff 64 --seq 64 --batch 2)
fi

# name | mixlab --set values (';'-separated) | torch arguments
MODELS=(
  "dense|model.mixer={kind=\"dense\",n_heads=$HEADS}|--mixer dense"
  "fnet|model.mixer={kind=\"fourier\",implementation=\"auto\"};train.objective=\"masked\"|--mixer fourier --causal 0"
  "sparse-strided|model.mixer={kind=\"sparse\",n_heads=$HEADS,block=$BLOCK,pattern=[{kind=\"strided\",stride=4}]}|--mixer sparse-strided --block $BLOCK --stride 4"
  "allattn|model.mixer={kind=\"persistent\",n_heads=$HEADS};model.d_ff=0|--mixer persistent"
)

# --dry-run: one line per row, the model built at full size (`bench train --dry-run`: config
# validation and construction, nothing trained); exit 1 if any row cannot be built. The e2e
# tests run this, so a row that the GPU check would fail on fails CI first.
if [ "${1:-}" = --dry-run ]; then
  for entry in "${MODELS[@]}"; do
    IFS='|' read -r name sets _ <<<"$entry"
    args=()
    IFS=';' read -ra parts <<<"$sets"
    for s in "${parts[@]}"; do args+=(--set "$s"); done
    if line=$("$BIN/bench" train --dry-run --config configs/bench-base.toml --backend "$BACKEND" \
      "${SIZE[@]}" "${args[@]}"); then
      params=$(sed -n 's/.*"params":\([0-9]*\).*/\1/p' <<<"$line")
      echo "dry-run $name: ok ($params parameters on $BACKEND)"
    else
      echo "dry-run $name: FAILED (the error is above)"
      status=1
    fi
  done
  exit "$status"
fi

# A real run: results go to OUT_DIR (after the dry-run branch, which writes nothing there).
mkdir -p "$OUT_DIR"
: >"$JSONL"

echo "== parity: flex vs $BACKEND" >&2
if ! "$BIN/bench" parity --backend "$BACKEND" | tee -a "$JSONL"; then
  echo "gpu-check: PARITY FAILED" >&2
  status=1
fi

echo "== the attention operation alone on $BACKEND (fused vs composed)" >&2
"$BIN/bench" attention --backend "$BACKEND" --heads "$HEADS" "${ATTN[@]}" | tee -a "$JSONL" \
  || status=1

have_cuda_torch=0
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  have_cuda_torch=1
else
  echo "gpu-check: no PyTorch with CUDA here; the PyTorch column stays empty" >&2
fi

for entry in "${MODELS[@]}"; do
  IFS='|' read -r name sets targs <<<"$entry"
  args=()
  IFS=';' read -ra parts <<<"$sets"
  for s in "${parts[@]}"; do args+=(--set "$s"); done
  echo "== $name: $STEPS steps on $BACKEND" >&2
  line=$("$BIN/bench" train --config configs/bench-base.toml --backend "$BACKEND" \
    --steps "$STEPS" --warmup "$WARMUP" "${SIZE[@]}" "${args[@]}") || { status=1; line=""; }
  [ -n "$line" ] && echo "{\"check\":\"mixlab\",\"name\":\"$name\",\"result\":$line}" >>"$JSONL"
  if [ "$have_cuda_torch" = 1 ]; then
    n_persistent=()
    [ "$name" = allattn ] && n_persistent=(--n-persistent "$(( ${TORCH_SIZE[3]} * 4 ))")
    # shellcheck disable=SC2086
    t=$("$PY" scripts/torch_reference.py $targs "${TORCH_SIZE[@]}" "${n_persistent[@]}" \
      --device cuda --steps "$STEPS" --warmup "$WARMUP") || t=""
    [ -n "$t" ] && echo "{\"check\":\"torch\",\"name\":\"$name\",\"result\":$t}" >>"$JSONL"
  fi
done

echo "== memory over $MEM_STEPS training steps (small workload, dense) on $BACKEND" >&2
mem=$("$BIN/bench" train --config configs/bench-small.toml --backend "$BACKEND" \
  --steps "$MEM_STEPS" --warmup 0 "${SIZE[@]}") || { status=1; mem=""; }
[ -n "$mem" ] && echo "{\"check\":\"memory\",\"result\":$mem}" >>"$JSONL"

"$PY" - "$JSONL" <<'PYEOF' | tee "$OUT_DIR/gpu-check.md"
import json, sys
rows, torch, memory, attention = {}, {}, [], []
device = "?"
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("kind") == "parity":
        device = r["device"]
        if "skipped" in r:
            print(f"parity {r['mixer']}: skipped ({r['skipped']})")
        else:
            print(f"parity {r['mixer']}: max logit rel diff {r['max_logit_rel_diff']:.2e} "
                  f"{'ok' if r['ok'] else 'FAILED'}")
    elif r.get("check") == "mixlab":
        rows[r["name"]] = r["result"]
    elif r.get("check") == "torch":
        torch[r["name"]] = r["result"]
    elif r.get("check") == "memory":
        memory = r["result"]["memory_series"]
    elif r.get("kind") == "attention":
        attention.append(r)
print(f"\ndevice: {device}\n")
print("| model | Mixlab tokens/s | peak device MiB | GFLOP/s | PyTorch CUDA tokens/s | PyTorch peak MiB | Mixlab / PyTorch |")
print("|---|---|---|---|---|---|---|")
fmt = lambda x, f="{:,.0f}": "-" if x is None else f.format(x)
for name, m in rows.items():
    t = torch.get(name, {})
    ratio = m["tokens_per_s"] / t["tokens_per_s"] if t else None
    print(f"| {name} | {fmt(m['tokens_per_s'])} | {fmt(m.get('peak_device_memory_mb'))} | "
          f"{fmt(m.get('achieved_gflops'), '{:,.1f}')} | {fmt(t.get('tokens_per_s'))} | "
          f"{fmt(t.get('peak_device_memory_mb'))} | {fmt(ratio, '{:.2f}')} |")
if attention:
    a = attention[0]
    print(f"\nattention operation alone (batch {a['batch']}, {a['heads']} heads, d_head {a['d_head']}, "
          f"{'causal' if a['causal'] else 'bidirectional'}, forward + backward):\n")
    print("| n | fused s | fused TFLOP/s | composed s | composed / fused | max abs diff |")
    print("|---|---|---|---|---|---|")
    for a in attention:
        print(f"| {a['n']} | {a['fused_s']:.4f} | {a['fused_tflops']:.3g} | "
              f"{fmt(a['composed_s'], '{:.4f}')} | {fmt(a['composed_over_fused'], '{:.2f}')} | "
              f"{fmt(a['max_abs_diff'], '{:.1e}')} |")
if "dense" in rows and "fnet" in rows:
    speedup = rows['dense']['step_s_median'] / rows['fnet']['step_s_median']
    print(f"\nFNet training step vs dense: {speedup:.2f}x (dense step time / FNet step time; target >= 1.8)")
if memory:
    key = "device_reserved_mb" if memory[0].get("device_reserved_mb") is not None else "rss_mb"
    series = [(m["step"], m[key]) for m in memory]
    print(f"\nmemory ({key}, MiB) over {series[-1][0]} steps: " +
          ", ".join(f"{s}: {v:.0f}" for s, v in series))
    print(f"growth from the first sample to the last: {series[-1][1] - series[0][1]:+.1f} MiB")
else:
    print("\nmemory: no series (the memory run failed)")
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit "$status"
