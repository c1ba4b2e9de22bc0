#!/usr/bin/env bash
# Builds helm from its Go module, once per version, for the chart's tests (lint, template, and an
# install into the tests' real kube-apiserver). Cached outside the checkout (CI runs in a fresh
# clone): ${MAILPROXY_HELM_BIN:-~/.cache/mailproxy/helm-v$HELM_VERSION}/helm. Prints the path of
# the binary.
set -euo pipefail
# shellcheck source=lib/go-tool.sh
source "$(dirname "$0")/lib/go-tool.sh"

HELM_VERSION="${HELM_VERSION:-3.19.5}"
out="${MAILPROXY_HELM_BIN:-$HOME/.cache/mailproxy/helm-v$HELM_VERSION}"

if [ -x "$out/helm" ]; then
  echo "$out/helm"
  exit 0
fi

command -v go >/dev/null || { echo "go is needed to build helm: install Go 1.24 or newer" >&2; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# What `helm template` and `helm lint` assume of the cluster, as helm's own Makefile sets it: the
# Kubernetes version of its client-go (v0.34 for helm 3.19), not client-go's built-in v1.20.
kube_version=""
for package in pkg/lint/rules pkg/chartutil; do
  kube_version+=" -X helm.sh/helm/v3/$package.k8sVersionMajor=1 -X helm.sh/helm/v3/$package.k8sVersionMinor=34"
done
build_go_tool "$work" helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$out/helm" \
  "-X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION $kube_version"
echo "$out/helm"
