#!/usr/bin/env bash
# Same cores, two ways: 1 process x 2 threads against `mpirun -np 2` x 1 thread, the
# bench-small model on tiny-shakespeare, ROUNDS alternating runs; median tokens/s of steps
# 6-25 and the all-reduce's time and size per step. Needs a build with the `mpi` feature:
#   cargo build --release --features mixlab-train/mpi && scripts/mpi_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN="${CARGO_TARGET_DIR:-target}/release/train"
DATA="${DATA:-../shared/datasets/tinyshakespeare/input.txt}"
ROUNDS="${ROUNDS:-3}"
OUT="$(mktemp -d)"
SETS=(--config configs/bench-small.toml --set 'data.corpus="text"' --set "data.path=\"$DATA\""
  --set train.steps=25 --set train.log_every=1 --set train.eval_every=0
  --set train.checkpoint_every=0 --set 'train.backend="flex"')
MPIRUN=(mpirun --oversubscribe --bind-to none --mca pml ob1 --mca btl self,tcp
  --mca btl_tcp_if_include lo -x RAYON_NUM_THREADS=1)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
median() {
  python3 - "$1" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train = [l for l in lines if l["split"] == "train"][5:]
tokens = statistics.median(l["tokens_per_s"] for l in train)
text = f"{tokens:.0f} tokens/s"
if "all_reduce_ms" in train[0]:
    ms = statistics.median(l["all_reduce_ms"] for l in train)
    text += f", all-reduce {ms:.1f} ms and {train[0]['all_reduce_mb']:.2f} MB per step"
print(text)
PY
}
for round in $(seq "$ROUNDS"); do
  RAYON_NUM_THREADS=2 "$TRAIN" "${SETS[@]}" --set "train.run_dir=\"$OUT/one-$round\"" >/dev/null 2>&1
  echo "round $round, 1 process x 2 threads: $(median "$OUT/one-$round")"
  "${MPIRUN[@]}" -np 2 "$TRAIN" "${SETS[@]}" --set "train.run_dir=\"$OUT/two-$round\"" >/dev/null 2>&1
  echo "round $round, 2 processes x 1 thread: $(median "$OUT/two-$round")"
done
rm -rf "$OUT"
