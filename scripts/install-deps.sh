#!/usr/bin/env bash
# Installs what mailproxy's tests and local fleet need, idempotently, from Debian's packages:
#   memcached                          the route cache shared by a proxy fleet
#   dovecot-imapd dovecot-pop3d        real IMAP and POP3 mailbox backends
#   nginx-light libnginx-mod-mail      stock nginx with its mail module: the reference peer
#   wrk                                HTTP load generator for the benchmarks
#   umoci skopeo                       container images without a container engine
# and the Rust components the checks use (rustfmt, clippy). Needs root (or sudo) for apt-get.
set -euo pipefail

packages=(memcached dovecot-imapd dovecot-pop3d nginx-light libnginx-mod-mail wrk umoci skopeo)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  # Tests start their own servers on free ports; the packages' system services are not needed.
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    rustup component add "$component" >/dev/null 2>&1 || echo "note: rustup could not add $component"
  fi
done
