#!/usr/bin/env bash
# Builds the `aigrid:dev` image from scratch: compiles the release binary, copies it
# with the shared libraries it needs into docker/rootfs, and runs `docker build`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
cd "$root"
cargo build --release -p aigrid
bin="$root/target/release/aigrid"
rootfs="$here/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/tmp" "$rootfs/data" "$rootfs/etc"
cp "$bin" "$rootfs/usr/local/bin/aigrid"
# The dynamic loader and every library the binary links, at their own paths.
ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
# The CA bundle: the HTTP client loads system roots even for plain-HTTP peers.
mkdir -p "$rootfs/etc/ssl/certs"
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
chmod 1777 "$rootfs/tmp"
docker build -t aigrid:dev "$here"
echo "built aigrid:dev; start a cluster with: docker compose -f docker/compose.yaml up -d"
