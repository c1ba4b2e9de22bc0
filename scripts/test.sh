#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then formatting, lints, every test
# (each test starts its own memcached, Dovecot and nginx on free loopback ports), and a short
# fuzzing run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Build artifacts live outside the checkout so that a fresh clone (CI) reuses them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mailproxy/target}"
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

# The control plane of the operator and route-table tests: etcd, kube-apiserver and
# kube-controller-manager built from Go modules, cached under ~/.cache/mailproxy (slow once).
step "Kubernetes control-plane binaries"
MAILPROXY_K8S_BIN="$(scripts/control-plane-binaries.sh)"
export MAILPROXY_K8S_BIN

# helm for the chart's tests (lint, template, install into that control plane), also cached.
step "helm"
MAILPROXY_HELM="$(scripts/helm-binary.sh)"
export MAILPROXY_HELM

if cargo fmt --version >/dev/null 2>&1; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
else
  echo "note: rustfmt is not installed on this machine; formatting not checked"
fi

if cargo clippy --version >/dev/null 2>&1; then
  step "cargo clippy -D warnings"
  cargo clippy --workspace --all-targets --locked -- -D warnings
else
  echo "note: clippy is not installed on this machine; lints not checked"
fi

# The container images (release binaries, umoci and skopeo), checked by e2e/tests/images.rs.
step "container images"
MAILPROXY_IMAGES="$CARGO_TARGET_DIR/images"
scripts/build-images.sh "$MAILPROXY_IMAGES"
export MAILPROXY_IMAGES

step "cargo test"
cargo test --workspace --locked

if [ -d proxy/fuzz ]; then
  step "fuzz smoke run"
  scripts/fuzz-smoke.sh
fi
