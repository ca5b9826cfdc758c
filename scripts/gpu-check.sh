#!/usr/bin/env bash
# The GPU check, as one script, for both of wgpu's shader compilers side by side: WGSL (the
# plain `bench`) and SPIR-V (`bench-spirv`, built with `--features vulkan`: tensor-core
# matmuls through Vulkan's cooperative-matrix extension where the driver has it). For each
# compiler found in MIXLAB_BIN: backend parity (wgpu vs flex, every mixer family), the `base`
# workload (configs/bench-base.toml) for STEPS steps with dense, FNet, sparse and
# all-attention (tokens/s, peak GPU memory, achieved GFLOP/s), dense in f16 and bf16 (a
# refusal where the adapter lacks the type is recorded, not a failure), and the attention
# operation alone (fused kernels vs composed ops, TFLOP/s); once: the same models with the
# PyTorch reference on CUDA when a torch with CUDA is there, and GPU memory over MEM_STEPS
# training steps (burn#5212 / #4792 watch). Prints a markdown table; JSON lines go to OUT_DIR.
#
#   scripts/gpu-check.sh                      # on a GPU machine, binaries in target/release
#   SMOKE=1 scripts/gpu-check.sh              # tiny sizes: runs end to end on lavapipe (CPU)
#   scripts/gpu-check.sh --dry-run            # every row's model validated and built at full
#                                             # size with every bench found, nothing trained
#
# One device run of at most 10 minutes: every row runs under `timeout ROW_S`, and rows that
# would start after BUDGET_S seconds are skipped (recorded as such), so the table is always
# written. Order: parity, the models and the half-precision rows for each compiler, then the
# attention operation, PyTorch, memory.
#
# The device machine has no Rust toolchain: `scripts/gpu-bundle.sh` builds both benches here
# and packs them (stripped, gzipped) into .gpu/, which a device run carries
# (docs/BENCHMARKS.md). Environment: MIXLAB_BIN (folder with bench and/or bench-spirv; default
# target/release or $CARGO_TARGET_DIR/release), OUT_DIR (default $OUT, else runs/gpu-check),
# STEPS (60), MEM_STEPS (300), BUDGET_S (540), ROW_S (150), PYTHON (python3), BACKEND (the
# WGSL bench's backend, wgpu; the SPIR-V bench uses vulkan, or BACKEND when it is flex).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${MIXLAB_BIN:-${CARGO_TARGET_DIR:-target}/release}"
OUT_DIR="${OUT_DIR:-${OUT:-runs/gpu-check}}"
BACKEND="${BACKEND:-wgpu}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-60}"
MEM_STEPS="${MEM_STEPS:-300}"
BUDGET_S="${BUDGET_S:-540}"
ROW_S="${ROW_S:-150}"
WARMUP=5
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
JSONL="$OUT_DIR/gpu-check.jsonl"
status=0
start=$(date +%s)

# The compilers whose bench is here: name, binary, backend.
COMPILERS=()
[ -x "$BIN/bench" ] && COMPILERS+=("wgsl|$BIN/bench|$BACKEND")
spirv_backend=vulkan
[ "$BACKEND" = flex ] && spirv_backend=flex
[ -x "$BIN/bench-spirv" ] && COMPILERS+=("spirv|$BIN/bench-spirv|$spirv_backend")
if [ "${#COMPILERS[@]}" = 0 ]; then
  echo "gpu-check: neither $BIN/bench nor $BIN/bench-spirv exists (scripts/gpu-bundle.sh)" >&2
  exit 1
fi

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

# name | mixlab --set values (';'-separated) | torch arguments (empty: no PyTorch row)
DENSE="model.mixer={kind=\"dense\",n_heads=$HEADS}"
MODELS=(
  "dense|$DENSE|--mixer dense"
  "fnet|model.mixer={kind=\"fourier\",implementation=\"auto\"};train.objective=\"masked\"|--mixer fourier --causal 0"
  "sparse-strided|model.mixer={kind=\"sparse\",n_heads=$HEADS,block=$BLOCK,pattern=[{kind=\"strided\",stride=4}]}|--mixer sparse-strided --block $BLOCK --stride 4"
  "allattn|model.mixer={kind=\"persistent\",n_heads=$HEADS};model.d_ff=0|--mixer persistent"
  "dense-f16|$DENSE;train.precision=\"f16\";optim.eps=1e-4|"
  "dense-bf16|$DENSE;train.precision=\"bf16\"|"
)

# The --set arguments of a row.
row_args() {
  local sets="$1" parts s
  ARGS=()
  IFS=';' read -ra parts <<<"$sets"
  for s in "${parts[@]}"; do ARGS+=(--set "$s"); done
}

# Whether a half-precision row's failure is the adapter refusing the type (recorded, not a
# failure of the check).
refused() { grep -q "does not support" <<<"$1"; }

# --dry-run: one line per (compiler, row), the model built at full size (`bench train
# --dry-run`: config validation and construction, nothing trained); exit 1 if any row cannot
# be built. The e2e tests run it with the WGSL bench and scripts/test-spirv.sh with the SPIR-V
# one, so a row that the GPU check would fail on fails CI first.
if [ "${1:-}" = --dry-run ]; then
  for compiler in "${COMPILERS[@]}"; do
    IFS='|' read -r cname bench backend <<<"$compiler"
    for entry in "${MODELS[@]}"; do
      IFS='|' read -r name sets _ <<<"$entry"
      row_args "$sets"
      if line=$("$bench" train --dry-run --config configs/bench-base.toml --backend "$backend" \
        "${SIZE[@]}" "${ARGS[@]}" 2>&1); then
        params=$(sed -n 's/.*"params":\([0-9]*\).*/\1/p' <<<"$line")
        echo "dry-run $cname $name: ok ($params parameters on $backend)"
      elif [[ $name == *-f16 || $name == *-bf16 ]] && refused "$line"; then
        echo "dry-run $cname $name: refused by the adapter ($(tail -1 <<<"$line"))"
      else
        echo "$line" >&2
        echo "dry-run $cname $name: FAILED (the error is above)"
        status=1
      fi
    done
  done
  exit "$status"
fi

# A real run: results go to OUT_DIR (after the dry-run branch, which writes nothing there).
mkdir -p "$OUT_DIR"
: >"$JSONL"

# Run a row under the time budget: prints its stdout, returns its status (124: timed out;
# 125: skipped, over budget).
row() {
  local what="$1"
  shift
  if [ $(($(date +%s) - start)) -ge "$BUDGET_S" ]; then
    echo "gpu-check: $what skipped (past the ${BUDGET_S} s budget)" >&2
    echo "{\"check\":\"skipped\",\"what\":\"$what\"}" >>"$JSONL"
    return 125
  fi
  echo "== $what" >&2
  timeout "$ROW_S" "$@"
}

# Each JSON line of a compiler's row, tagged with the compiler.
tag() { sed "s/^{/{\"compiler\":\"$1\",/"; }

for compiler in "${COMPILERS[@]}"; do
  IFS='|' read -r cname bench backend <<<"$compiler"
  if out=$(row "parity $cname: flex vs $backend" "$bench" parity --backend "$backend"); then
    tag "$cname" <<<"$out" | tee -a "$JSONL"
  else
    [ -n "$out" ] && tag "$cname" <<<"$out" >>"$JSONL"
    echo "gpu-check: PARITY FAILED ($cname)" >&2
    status=1
  fi
done

for compiler in "${COMPILERS[@]}"; do
  IFS='|' read -r cname bench backend <<<"$compiler"
  for entry in "${MODELS[@]}"; do
    IFS='|' read -r name sets _ <<<"$entry"
    row_args "$sets"
    err="$OUT_DIR/$cname-$name.err"
    if line=$(row "$name: $STEPS steps on $backend ($cname)" "$bench" train \
      --config configs/bench-base.toml --backend "$backend" --steps "$STEPS" \
      --warmup "$WARMUP" "${SIZE[@]}" "${ARGS[@]}" 2>"$err"); then
      echo "{\"check\":\"mixlab\",\"compiler\":\"$cname\",\"name\":\"$name\",\"result\":$line}" >>"$JSONL"
    elif refused "$(cat "$err")"; then
      why=$(grep "does not support" "$err" | tail -1 | sed 's/"/\\"/g')
      echo "{\"check\":\"refused\",\"compiler\":\"$cname\",\"name\":\"$name\",\"why\":\"$why\"}" >>"$JSONL"
    else
      tail -3 "$err" >&2
      status=1
    fi
  done
done

for compiler in "${COMPILERS[@]}"; do
  IFS='|' read -r cname bench backend <<<"$compiler"
  if out=$(row "the attention operation alone on $backend ($cname), fused vs composed" \
    "$bench" attention --backend "$backend" --heads "$HEADS" "${ATTN[@]}"); then
    tag "$cname" <<<"$out" >>"$JSONL"
  else
    status=1
  fi
done

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  for entry in "${MODELS[@]}"; do
    IFS='|' read -r name _ targs <<<"$entry"
    [ -z "$targs" ] && continue
    n_persistent=()
    [ "$name" = allattn ] && n_persistent=(--n-persistent "$(( ${TORCH_SIZE[3]} * 4 ))")
    # shellcheck disable=SC2086
    t=$(row "$name: PyTorch on CUDA" "$PY" scripts/torch_reference.py $targs "${TORCH_SIZE[@]}" \
      "${n_persistent[@]}" --device cuda --steps "$STEPS" --warmup "$WARMUP") || t=""
    [ -n "$t" ] && echo "{\"check\":\"torch\",\"name\":\"$name\",\"result\":$t}" >>"$JSONL"
  done
else
  echo "gpu-check: no PyTorch with CUDA here; the PyTorch column stays empty" >&2
fi

IFS='|' read -r cname bench backend <<<"${COMPILERS[0]}"
if mem=$(row "memory over $MEM_STEPS training steps (small workload, dense) on $backend ($cname)" \
  "$bench" train --config configs/bench-small.toml --backend "$backend" \
  --steps "$MEM_STEPS" --warmup 0 "${SIZE[@]}"); then
  echo "{\"check\":\"memory\",\"compiler\":\"$cname\",\"result\":$mem}" >>"$JSONL"
else
  status=1
fi

"$PY" - "$JSONL" "$(($(date +%s) - start))" <<'PYEOF' | tee "$OUT_DIR/gpu-check.md"
import json, sys
rows, refused, torch, memory, attention, skipped = {}, {}, {}, [], [], []
devices = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    c = r.get("compiler", "?")
    if r.get("kind") == "parity":
        devices[c] = r["device"]
        if "skipped" in r:
            print(f"parity {c} {r['mixer']}: skipped ({r['skipped']})")
        else:
            print(f"parity {c} {r['mixer']}: max logit rel diff {r['max_logit_rel_diff']:.2e} "
                  f"{'ok' if r['ok'] else 'FAILED'}")
    elif r.get("check") == "mixlab":
        rows[(r["name"], c)] = r["result"]
    elif r.get("check") == "refused":
        refused[(r["name"], c)] = r["why"]
    elif r.get("check") == "torch":
        torch[r["name"]] = r["result"]
    elif r.get("check") == "memory":
        memory = r["result"]["memory_series"]
    elif r.get("kind") == "attention":
        attention.append((c, r))
    elif r.get("check") == "skipped":
        skipped.append(r["what"])
print("\n" + "\n".join(f"device ({c}): {d}" for c, d in devices.items()) + "\n")
print("| model | compiler | Mixlab tokens/s | peak device MiB | GFLOP/s | PyTorch CUDA tokens/s | Mixlab / PyTorch |")
print("|---|---|---|---|---|---|---|")
fmt = lambda x, f="{:,.0f}": "-" if x is None else f.format(x)
names = list(dict.fromkeys([n for n, _ in list(rows) + list(refused)]))
compilers = list(dict.fromkeys([c for _, c in list(rows) + list(refused)]))
for name in names:
    for c in compilers:
        t = torch.get(name, {})
        if (name, c) in refused:
            print(f"| {name} | {c} | refused: {refused[(name, c)]} | | | | |")
            continue
        m = rows.get((name, c))
        if m is None:
            print(f"| {name} | {c} | failed or skipped | | | | |")
            continue
        ratio = m["tokens_per_s"] / t["tokens_per_s"] if t else None
        print(f"| {name} | {c} | {fmt(m['tokens_per_s'])} | {fmt(m.get('peak_device_memory_mb'))} | "
              f"{fmt(m.get('achieved_gflops'), '{:,.1f}')} | {fmt(t.get('tokens_per_s'))} | "
              f"{fmt(ratio, '{:.2f}')} |")
ratios = [f"{n} {rows[(n, 'spirv')]['tokens_per_s'] / rows[(n, 'wgsl')]['tokens_per_s']:.2f}"
          for n in names if (n, 'wgsl') in rows and (n, 'spirv') in rows]
if ratios:
    print("\nSPIR-V / WGSL tokens/s: " + ", ".join(ratios))
if attention:
    a = attention[0][1]
    print(f"\nattention operation alone (batch {a['batch']}, {a['heads']} heads, d_head {a['d_head']}, "
          f"{'causal' if a['causal'] else 'bidirectional'}, forward + backward):\n")
    print("| compiler | n | fused s | fused TFLOP/s | composed s | composed / fused | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for c, a in attention:
        print(f"| {c} | {a['n']} | {a['fused_s']:.4f} | {a['fused_tflops']:.3g} | "
              f"{fmt(a['composed_s'], '{:.4f}')} | {fmt(a['composed_over_fused'], '{:.2f}')} | "
              f"{fmt(a['max_abs_diff'], '{:.1e}')} |")
for c in compilers:
    if ("dense", c) in rows and ("fnet", c) in rows:
        speedup = rows[("dense", c)]['step_s_median'] / rows[("fnet", c)]['step_s_median']
        print(f"\nFNet training step vs dense ({c}): {speedup:.2f}x (target >= 1.8)")
if memory:
    key = "device_reserved_mb" if memory[0].get("device_reserved_mb") is not None else "rss_mb"
    series = [(m["step"], m[key]) for m in memory]
    print(f"\nmemory ({key}, MiB) over {series[-1][0]} steps: " +
          ", ".join(f"{s}: {v:.0f}" for s, v in series))
    print(f"growth from the first sample to the last: {series[-1][1] - series[0][1]:+.1f} MiB")
else:
    print("\nmemory: no series (the memory run failed or was skipped)")
if skipped:
    print("\nskipped (time budget): " + "; ".join(skipped))
print(f"\nwall time: {sys.argv[2]} s")
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit "$status"
