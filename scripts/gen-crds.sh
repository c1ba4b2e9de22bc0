#!/usr/bin/env bash
# Regenerates the committed CustomResourceDefinitions under crds/ from the Rust types.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p mailproxy-operator -- crds --out-dir crds
