#!/usr/bin/env bash
# Sets up this machine and runs a working local mailproxy fleet until Ctrl-C: memcached, two
# Dovecot mailbox servers, `mailproxy lookupd` as the Route Lookup Handler and `mailproxy serve`
# in front on 127.0.0.1:1143 (IMAP) and 127.0.0.1:1110 (POP3).
# Ports: MAILPROXY_IMAP_PORT, MAILPROXY_POP3_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailproxy/target}"
cargo build --release --locked -p mailproxy -p mailproxy-testkit --bins
exec "$CARGO_TARGET_DIR/release/local-fleet"
