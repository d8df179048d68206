#!/usr/bin/env bash
# Installs every system dependency runv needs on a fresh Debian 12 machine, then builds the workspace.
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

PKGS=(libclang-dev clang busybox-static e2fsprogs erofs-utils runc cpio binutils gcc containerd)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/kvm ]; then
    echo "setup: WARNING: /dev/kvm is missing; KVM tests will print SKIPPED" >&2
fi

cargo build --workspace --all-targets --quiet
bash scripts/build-agent.sh >/dev/null
echo "setup: ok"
