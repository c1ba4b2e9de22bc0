#!/usr/bin/env bash
# Regenerates the committed CustomResourceDefinitions from the Rust types: crds/ (for
# `kubectl apply -f crds/`) and the Helm chart's crds/ (a test checks the two are identical).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p mailproxy-operator -- crds --out-dir crds
cp crds/mailproxy.io_*.yaml charts/mailproxy-operator/crds/
