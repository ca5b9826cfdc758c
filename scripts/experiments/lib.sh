# Shared start of the experiment scripts that train on a corpus file. Source it, then
#   experiment_setup NAME "$@"
# checks the optional CORPUS_FILE argument (resolved before changing directory), moves to the
# repository root, builds `train` and `report`, and sets BIN, CORPUS (default: ../shared's
# tiny-shakespeare), DATA (the `--set data.path=...` when that file exists, else empty: the
# config's named corpus is downloaded) and OUT (runs/NAME, emptied).
experiment_setup() {
  local name="$1"
  shift
  if [ -n "${1:-}" ]; then
    [ -f "$1" ] || { echo "error: corpus file $1 does not exist" >&2; exit 1; }
    CORPUS="$(realpath "$1")"
  fi
  cd "$(dirname "${BASH_SOURCE[0]}")/../.."
  cargo build --release --bin train --bin report >&2
  BIN="${CARGO_TARGET_DIR:-target}/release"
  CORPUS="${CORPUS:-../shared/datasets/tinyshakespeare/input.txt}"
  DATA=()
  [ -f "$CORPUS" ] && DATA=(--set "data.path=\"$CORPUS\"")
  OUT="runs/$name"
  rm -rf "$OUT"
  mkdir -p "$OUT"
}
