#!/usr/bin/env bash
# Benchmarks mailproxy's web proxy side by side with stock nginx as reverse proxy (issue 5): one
# nginx backend serving 1 KiB, each proxy in front of it in turn, wrk with keep-alive against
# each the same way. Prints a Markdown table of requests/s and p99 latency with ratios
# (docs/benchmarks.md, "HTTP", explains it). Needs nginx (nginx-light) and wrk.
#
#   scripts/bench-http.sh [mailbench http options, e.g. --duration 10 --connections 50 --one-core]
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -p mailproxy -p mailproxy-bench

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"
echo "nginx: $(nginx -v 2>&1 | cut -d/ -f2), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
"$TARGET/release/mailbench" http --mailproxy "$TARGET/release/mailproxy" "$@"
