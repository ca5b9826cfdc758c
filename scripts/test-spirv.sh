#!/usr/bin/env bash
# The SPIR-V half of the test suite (.ci/run runs it after the README's test command): a
# `vulkan` build, in which Burn's wgpu compiles kernels to SPIR-V on Vulkan adapters, of
#   1. the Cube attention kernels' tests (crates/models, ops::attention::cube), on Mesa's
#      lavapipe with the Khronos validation layer on: they fail on a wrong value, and this
#      script fails on any "Validation Error" (invalid SPIR-V or API misuse);
#   2. `bench` with that feature, whose GPU-check rows must all build (gpu-check --dry-run).
# Burn's own matmul and reduction kernels are not run here: cubecl-spirv 0.11.3 compiles
# shared memory to invalid SPIR-V on devices without VK_KHR_workgroup_memory_explicit_layout
# (lavapipe), which crashes the driver (docs/DEVICES.md has the reproducer). A second build of
# Burn (17 minutes cold on 2 cores after the default build); it shares the cargo target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
features="mixlab-train/mpi,mixlab-train/vulkan"
log="$(mktemp)"
VK_INSTANCE_LAYERS=VK_LAYER_KHRONOS_validation MIXLAB_REQUIRE_WGPU=1 \
  cargo test --release --workspace --features "$features" --lib -- ops::attention::cube 2>&1 \
  | tee "$log"
if grep -q "Validation Error" "$log"; then
  echo "test-spirv: the Vulkan validation layer reported errors (above)" >&2
  exit 1
fi
ran=$(grep -c "^test ops::attention::cube::tests::.* ok$" "$log" || true)
if [ "$ran" -lt 4 ]; then
  echo "test-spirv: $ran Cube kernel tests passed, 4 expected" >&2
  exit 1
fi
cargo build --release --features "$features" --bin bench
bin="$(mktemp -d)"
cp "${CARGO_TARGET_DIR:-target}/release/bench" "$bin/bench-spirv"
MIXLAB_BIN="$bin" BACKEND=flex scripts/gpu-check.sh --dry-run
