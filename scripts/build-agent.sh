#!/usr/bin/env bash
# Builds the statically linked runv-agent (crt-static on the gnu target) into
# target/static/x86_64-unknown-linux-gnu/release/runv-agent and prints its path.
# An explicit --target keeps the static flag off build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --quiet --release -p agent --bin runv-agent \
    --target x86_64-unknown-linux-gnu --target-dir target/static
echo "$PWD/target/static/x86_64-unknown-linux-gnu/release/runv-agent"
