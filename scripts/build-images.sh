#!/usr/bin/env bash
# Builds the container images of mailproxy (the data plane) and mailproxy-operator without a
# container engine or a base image from a registry: each image is one layer holding the release
# binary, the shared libraries `ldd` names for it (glibc, libgcc_s), CA certificates, a passwd
# entry for the non-root user 65532 and a /tmp, assembled with umoci and exported with skopeo.
#
#   scripts/build-images.sh [OUT_DIR]      (default: target/images)
#
# Writes OUT_DIR/oci (an OCI image layout, tags mailproxy-<version> and
# mailproxy-operator-<version>) and OUT_DIR/<name>.tar (docker-archive, tagged
# mailproxy/<name>:<version>: `docker load -i`, `kind load image-archive`, `ctr images import`).
# Needs root (umoci unpacks with the files' owners) and the Debian packages umoci and skopeo.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-target/images}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
target="${CARGO_TARGET_DIR:-target}"
if [ "$(id -u)" -ne 0 ]; then
  echo "build-images.sh needs root: umoci unpacks and repacks files with their owners (uid 65532)" >&2
  exit 1
fi
for tool in umoci skopeo ldd; do
  command -v "$tool" >/dev/null || { echo "$tool is needed: apt-get install umoci skopeo" >&2; exit 1; }
done

cargo build --release --locked -p mailproxy -p mailproxy-operator

rm -rf "$out/oci"
mkdir -p "$out"
umoci init --layout "$out/oci"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for binary in mailproxy mailproxy-operator; do
  tag="$binary-$version"
  bundle="$work/$binary"
  umoci new --image "$out/oci:$tag"
  umoci unpack --image "$out/oci:$tag" "$bundle" >/dev/null
  rootfs="$bundle/rootfs"
  install -D -m 0755 "$target/release/$binary" "$rootfs/usr/local/bin/$binary"
  # The dynamic loader and every library the binary links, at the paths it looks for them.
  for library in $(ldd "$target/release/$binary" | grep -o '/[^ ]*'); do
    install -D -m 0644 "$(readlink -f "$library")" "$rootfs$library"
  done
  chmod 0755 "$rootfs"/lib64/ld-linux-*.so.* 2>/dev/null || true
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
  install -d -m 1777 "$rootfs/tmp"
  install -d -m 0755 -o 65532 -g 65532 "$rootfs/home/nonroot"
  umoci repack --image "$out/oci:$tag" "$bundle"
  umoci config --image "$out/oci:$tag" \
    --os linux --architecture amd64 \
    --config.user 65532:65532 \
    --config.entrypoint "/usr/local/bin/$binary" \
    --config.workingdir / \
    --config.env "PATH=/usr/local/bin" \
    --config.label "org.opencontainers.image.title=$binary" \
    --config.label "org.opencontainers.image.version=$version"
  umoci gc --layout "$out/oci"
  rm -f "$out/$binary.tar"
  skopeo copy --quiet "oci:$out/oci:$tag" "docker-archive:$out/$binary.tar:mailproxy/$binary:$version"
  echo "$out/$binary.tar: mailproxy/$binary:$version"
done
