#!/usr/bin/env bash
# Quick start step 1: install dependencies, build, boot the test guest in runv-vmm, clone a
# snapshot of it from a pool of pre-created VM shells, and run a busybox container in runv-agent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
vmm=$(bash scripts/build-vmm.sh)
guest=$(cargo run --quiet -p test-guests --example guest-path)
echo "quickstart: booting $guest in $vmm (serial and debug reports below)"
"$vmm" --kernel "$guest" --mem-mib 128 --vcpus 2 \
    --cmdline "rt.boot rt.serial=hello-from-runv rt.smp rt.exit=reset" \
    --serial stdout --debug-log -
echo "quickstart: the guest reset the VM and runv-vmm exited cleanly"
echo "quickstart: snapshot a template VM and clone it from pre-created shells"
cargo run --release --quiet -p pool-manager --example clone_demo -- "$vmm" "$guest"
echo "quickstart: run a busybox container through the static runv-agent (host transport)"
agent=$(bash scripts/build-agent.sh)
cargo run --quiet -p agent --example run_container -- "$agent"
