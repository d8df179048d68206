#!/usr/bin/env bash
# Quick start step 1: install dependencies, build, and boot the test guest in runv-vmm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --quiet -p vmm --bins
guest=$(cargo run --quiet -p test-guests --example guest-path)
echo "quickstart: booting $guest in runv-vmm (serial and debug reports below)"
target/release/runv-vmm --kernel "$guest" --mem-mib 128 --vcpus 2 \
    --cmdline "rt.boot rt.serial=hello-from-runv rt.smp rt.exit=reset" \
    --serial stdout --debug-log -
echo "quickstart: the guest reset the VM and runv-vmm exited cleanly"
