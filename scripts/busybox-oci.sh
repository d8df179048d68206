#!/usr/bin/env bash
# Builds a one-layer busybox OCI image (an OCI layout tar for `ctr image import`) from Debian's
# busybox-static, with no registry: scripts/busybox-oci.sh OUT.tar [IMAGE_NAME]
# IMAGE_NAME defaults to docker.io/runv/busybox:latest.
set -euo pipefail
out=$1
name=${2:-docker.io/runv/busybox:latest}
[ -x /bin/busybox ] || { echo "busybox-oci: /bin/busybox missing: apt-get install -y busybox-static (bash scripts/setup.sh)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev" "$work/root/sys" "$work/root/tmp" "$work/root/etc" "$work/oci/blobs/sha256"
cp /bin/busybox "$work/root/bin/busybox"
for a in sh echo cat sleep true false ps tty ls id wc head env; do ln -s busybox "$work/root/bin/$a"; done
# Reproducible layer: fixed owners and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/root" -cf "$work/layer.tar" .
blob() { # file media-type -> "digest size"
    local d; d=$(sha256sum "$1" | cut -d' ' -f1)
    cp "$1" "$work/oci/blobs/sha256/$d"
    echo "$d $(stat -c %s "$1")"
}
read -r ld ls_ < <(blob "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$ld" > "$work/config.json"
read -r cd_ cs < <(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' "$cd_" "$cs" "$ld" "$ls_" > "$work/manifest.json"
read -r md ms < <(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"latest"}}]}' "$md" "$ms" "$name" > "$work/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$out" .
