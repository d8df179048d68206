#!/usr/bin/env bash
# Builds the statically linked runv-vmm (crt-static on the gnu target, as the agent) into
# $CARGO_TARGET_DIR (else target)/static-vmm/x86_64-unknown-linux-gnu/release/runv-vmm and prints
# its path. A VMM process
# starts per VM: static, it skips the dynamic loader (~0.5 ms of every boot and restore).
# An explicit --target keeps the static flag off build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
# Symbols stay (crash reports); its own target dir, as its flags differ from the agent's.
dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")/static-vmm"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p vmm --bin runv-vmm \
    --target x86_64-unknown-linux-gnu --target-dir "$dir"
echo "$dir/x86_64-unknown-linux-gnu/release/runv-vmm"
