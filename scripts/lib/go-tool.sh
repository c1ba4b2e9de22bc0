# Sourced by the scripts that build test tools from Go modules (etcd, helm).

# build_go_tool WORK MODULE VERSION PACKAGE OUTPUT [LDFLAGS]: builds the command PACKAGE of
# MODULE at VERSION into OUTPUT, static and stripped, in the scratch directory WORK (a throwaway
# module that requires MODULE, as `go install` would, but with our link flags).
build_go_tool() {
  local work="$1" module="$2" version="$3" package="$4" output="$5" ldflags="${6:-}"
  mkdir -p "$work"
  (
    cd "$work"
    printf 'module mailproxy.local/tool\ngo 1.24\nrequire %s v%s\n' "$module" "$version" > go.mod
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$package" > tools.go
    echo "building $package v$version..." >&2
    GOFLAGS=-mod=mod go mod tidy -e >&2
    CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w $ldflags" \
      -o "$output" "$package" >&2
  )
}
