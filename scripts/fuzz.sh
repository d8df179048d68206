#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time each and fails on the first crash.
#
#   bash scripts/fuzz.sh [SECONDS]     # per target; default 60 (CI: 20)
#
# Targets: protocol/fuzz (frame_decoder: the agent protocol decoder) and fuzz/ (control_request,
# snapshot_state, oci_plan, virtio_blk, virtio_vsock, virtio_net). Each starts from the seeds kept in the
# repo (protocol/fuzz/corpus/<target>, fuzz/seeds/<target>) plus what earlier runs on this machine
# found (fuzz/corpus/<target>, ignored by git); a crash leaves its input in */artifacts/<target>/.
# Commit a minimised crash input (or a new interesting one) to the seeds with its fix.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "!!! scripts/fuzz.sh: NO NIGHTLY RUST TOOLCHAIN: fuzzing did NOT run (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "!!! scripts/fuzz.sh: cargo-fuzz IS NOT INSTALLED: fuzzing did NOT run (cargo install cargo-fuzz)" >&2
    exit 1
fi

# dir target seeds
targets=(
    "protocol frame_decoder protocol/fuzz/corpus/frame_decoder"
    ". control_request fuzz/seeds/control_request"
    ". snapshot_state fuzz/seeds/snapshot_state"
    ". oci_plan fuzz/seeds/oci_plan"
    ". virtio_blk fuzz/seeds/virtio_blk"
    ". virtio_vsock fuzz/seeds/virtio_vsock"
    ". virtio_net fuzz/seeds/virtio_net"
)

logs="$PWD/target/fuzz-logs"
mkdir -p "$logs"
failed=()
for t in "${targets[@]}"; do
    read -r dir name seeds <<<"$t"
    corpus="$PWD/fuzz/corpus/$name"
    mkdir -p "$corpus"
    echo "=== fuzz $name: ${secs}s from $seeds (log: $logs/$name.log)"
    if (cd "$dir" && nice -n 10 cargo +nightly fuzz run -O "$name" "$corpus" "$OLDPWD/$seeds" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1) \
        >"$logs/$name.log" 2>&1; then
        grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$logs/$name.log" | tail -2 || true
    else
        echo "!!! fuzz target $name FAILED (crash, timeout, leak or build error):" >&2
        # The input's Debug dump is one huge line: leave it in the log.
        grep -v '^\s*\[' "$logs/$name.log" | tail -30 >&2
        failed+=("$name")
    fi
done
if [ "${#failed[@]}" != 0 ]; then
    echo "!!! scripts/fuzz.sh: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "scripts/fuzz.sh: every target ran ${secs}s without a crash"
