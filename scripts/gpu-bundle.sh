#!/usr/bin/env bash
# Prepare a device run of scripts/gpu-check.sh: the device machine has no Rust toolchain and
# no network, so build `bench` here twice — WGSL (the default build) and SPIR-V
# (`--features vulkan`) — and pack both (stripped, gzipped, ~30 MB each) into .gpu/ as
# bench.gz and bench-spirv.gz, and fetch the Vulkan loader packages into .gl/ (as the device
# tool's README says). Both folders are git-ignored through .git/info/exclude. The two builds
# share the target dir (the second compiles Burn's wgpu crates again: about 17 minutes cold on
# 2 cores). Then, with the device tool (one run; the check keeps itself under 10 minutes):
#   run(command = "for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; mkdir -p /tmp/bin &&
#        for b in bench bench-spirv; do gunzip -c .gpu/$b.gz > /tmp/bin/$b; done &&
#        chmod +x /tmp/bin/* && MIXLAB_BIN=/tmp/bin scripts/gpu-check.sh",
#       carry = [".gpu", ".gl"], timeout_s = 600)
# (add `export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json` first if
# no Vulkan driver is found). A PyTorch with CUDA there fills the PyTorch column.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/release"
mkdir -p .gpu
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.gpu/ /.gl/; do grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >>"$EXCLUDE"; done
# name | cargo features
for build in "bench|" "bench-spirv|--features=mixlab-train/vulkan"; do
  IFS='|' read -r name features <<<"$build"
  # shellcheck disable=SC2086
  cargo build --release --bin bench $features >&2
  strip -o ".gpu/$name" "$BIN/bench"
  gzip -f -9 ".gpu/$name"
  ls -l ".gpu/$name.gz" >&2
done
# Every row of the check builds with both (nothing trained; on flex here).
mkdir -p /tmp/gpu-bundle-bin
for name in bench bench-spirv; do gunzip -c ".gpu/$name.gz" >"/tmp/gpu-bundle-bin/$name"; done
chmod +x /tmp/gpu-bundle-bin/*
MIXLAB_BIN=/tmp/gpu-bundle-bin BACKEND=flex scripts/gpu-check.sh --dry-run >&2
if [ ! -d .gl ] || [ -z "$(ls .gl/*.deb 2>/dev/null)" ]; then
  mkdir -p .gl /tmp/amd64/partial
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${o[@]}" update >&2
  (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >&2)
fi
du -sh .gpu .gl >&2
