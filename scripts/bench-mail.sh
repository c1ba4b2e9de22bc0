#!/usr/bin/env bash
# Benchmarks mailproxy side by side with stock nginx mail proxy on the same backends and the same
# route handler, in one run: logins per second, bulk FETCH throughput of 1 MiB messages, memory
# per idle session. Prints a Markdown table (docs/benchmarks.md explains it). Needs nginx with
# its mail module (nginx-light + libnginx-mod-mail) and Dovecot (dovecot-imapd); run as root
# (Dovecot's maildirs are given to the dovecot user).
#
#   scripts/bench-mail.sh [mailbench compare options, e.g. --duration 10 --clients 50]
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -p mailproxy -p mailproxy-bench

# 1000 idle sessions hold ~4000 descriptors across client, proxy and backend.
ulimit -n "$(ulimit -Hn)"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2), dovecot: $(dovecot --version)"
"$TARGET/release/mailbench" compare --mailproxy "$TARGET/release/mailproxy" "$@"
