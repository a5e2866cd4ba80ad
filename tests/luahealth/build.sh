#!/usr/bin/env bash
# Builds luahealth (main.go beside this script: Argo CD's way of running a health.lua) against
# the gopher-lua and gopher-json versions that the given Argo CD release pins in its go.mod, and
# caches the binary outside the checkout, keyed by those versions and main.go's content, the way
# tests/cluster/build-controlplane.sh caches the control plane. Prints the binary's directory.
# Called by tests/argocd.py; a warm call returns at once.
#
#   build.sh v3.5.7
set -euo pipefail

ARGOCD_VERSION=${1:?usage: build.sh ARGOCD_VERSION}
ARGOCD_MODULE=github.com/argoproj/argo-cd/v3
CACHE=${FMFORGE_CACHE:-$HOME/.cache/fmforge}
HERE=$(cd "$(dirname "$0")" && pwd)
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

modfile=$(go env GOMODCACHE)/cache/download/$ARGOCD_MODULE/@v/$ARGOCD_VERSION.mod
[[ -f $modfile ]] || go mod download "$ARGOCD_MODULE@$ARGOCD_VERSION" >&2
pinned() { sed -n "s#^[[:space:]]*$1 \(v[^ ]*\).*#\1#p" "$modfile" | head -1; }
lua_version=$(pinned github.com/yuin/gopher-lua)
json_version=$(pinned layeh.com/gopher-json)
[[ -n $lua_version && -n $json_version ]] || { echo "no gopher-lua/gopher-json in $modfile" >&2; exit 1; }

key=$( (cat "$HERE/main.go"; echo "$json_version") | sha256sum | cut -c1-12)
out="$CACHE/luahealth-$lua_version-$key"
if [[ -x $out/luahealth ]]; then echo "$out"; exit 0; fi
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "Building luahealth with gopher-lua $lua_version, gopher-json $json_version (Argo CD $ARGOCD_VERSION)" >&2
cp "$HERE/main.go" "$work/"
(
  cd "$work"
  go mod init fmforge.io/luahealth >/dev/null 2>&1
  go mod edit -require="github.com/yuin/gopher-lua@$lua_version" -require="layeh.com/gopher-json@$json_version"
  go mod tidy >&2
  go build -trimpath -ldflags "-s -w" -o "$out/luahealth.tmp" . >&2
)
mv "$out/luahealth.tmp" "$out/luahealth"
echo "$out"
