#!/usr/bin/env bash
# Prepare a device run of scripts/gpu-check.sh: the device machine has no Rust toolchain and
# no network, so build `bench` here and pack it (stripped, gzipped, ~30 MB) into .gpu/, and
# fetch the Vulkan loader packages into .gl/ (as the device tool's README says). Both folders
# are git-ignored through .git/info/exclude. Then, with the device tool:
#   run(command = "for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; mkdir -p /tmp/bin &&
#        gunzip -c .gpu/bench.gz > /tmp/bin/bench && chmod +x /tmp/bin/bench &&
#        MIXLAB_BIN=/tmp/bin scripts/gpu-check.sh", carry = [".gpu", ".gl"], timeout_s = 600)
# (add `export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json` first if
# no Vulkan driver is found). A PyTorch with CUDA there fills the PyTorch column.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin bench >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
mkdir -p .gpu
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
for d in /.gpu/ /.gl/; do grep -qxF "$d" "$EXCLUDE" 2>/dev/null || echo "$d" >>"$EXCLUDE"; done
strip -o .gpu/bench "$BIN/bench"
gzip -f -9 .gpu/bench
ls -l .gpu/bench.gz >&2
if [ ! -d .gl ] || [ -z "$(ls .gl/*.deb 2>/dev/null)" ]; then
  mkdir -p .gl /tmp/amd64/partial
  o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
  apt-get "${o[@]}" update >&2
  (cd .gl && apt-get "${o[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >&2)
fi
du -sh .gpu .gl >&2
