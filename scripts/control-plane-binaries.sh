#!/usr/bin/env bash
# Builds the Kubernetes control-plane binaries the operator's integration tests run as local
# processes (etcd, kube-apiserver, kube-controller-manager), from Go modules, once per version.
# They are cached outside the checkout (CI runs in a fresh clone):
#   ${MAILPROXY_K8S_BIN:-~/.cache/mailproxy/k8s-v$K8S_VERSION}/{etcd,kube-apiserver,kube-controller-manager}
# Prints the directory. Kubernetes v1.X.Y pairs with its staging modules at v0.X.Y; the version
# matches the k8s-openapi feature the workspace enables (v1_34).
set -euo pipefail
# shellcheck source=lib/go-tool.sh
source "$(dirname "$0")/lib/go-tool.sh"

K8S_VERSION="${K8S_VERSION:-1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.5}"
out="${MAILPROXY_K8S_BIN:-$HOME/.cache/mailproxy/k8s-v$K8S_VERSION}"

# The version the API server reports (/version, which helm checks against a chart's kubeVersion)
# is stamped at link time, as Kubernetes' own build does; binaries built before the stamp was
# added report v0.0.0 and are rebuilt (a relink when Go's build cache is warm).
stamp="k8s v$K8S_VERSION, etcd v$ETCD_VERSION, version stamped"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ] && [ -x "$out/etcd" ] &&
  [ "$(cat "$out/BUILD" 2>/dev/null)" = "$stamp" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "go is needed to build the control plane: install Go 1.24 or newer" >&2; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
minor="${K8S_VERSION#*.}"
staging_version="v0.$minor"

staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms
  kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller)

mkdir -p "$work/k8s"
{
  echo "module mailproxy.local/controlplane"
  echo "go 1.24"
  echo "require k8s.io/kubernetes v$K8S_VERSION"
  for module in "${staging[@]}"; do
    echo "replace k8s.io/$module => k8s.io/$module $staging_version"
  done
} > "$work/k8s/go.mod"
cat > "$work/k8s/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
version_flags=""
for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_flags+=" -X $package.gitVersion=v$K8S_VERSION -X $package.gitMajor=1 -X $package.gitMinor=$minor"
  version_flags+=" -X $package.gitTreeState=clean"
done
(
  cd "$work/k8s"
  echo "resolving k8s.io/kubernetes v$K8S_VERSION modules..." >&2
  GOFLAGS=-mod=mod go mod tidy -e >&2
  for binary in kube-apiserver kube-controller-manager; do
    echo "building $binary v$K8S_VERSION (several minutes the first time)..." >&2
    CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w $version_flags" -o "$out/$binary" "k8s.io/kubernetes/cmd/$binary" >&2
  done
)
build_go_tool "$work/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 "$out/etcd"
echo "$stamp" > "$out/BUILD"
echo "$out"
