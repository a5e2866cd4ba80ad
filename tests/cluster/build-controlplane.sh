#!/usr/bin/env bash
# Builds the Go binaries the tests need from the Go module proxy and caches them outside the
# checkout, keyed by version: the test control plane (etcd, kube-apiserver,
# kube-controller-manager, kubectl, the way controller-runtime's envtest gets them), helm, and
# versitygw (Versity's S3 gateway over a local directory: the S3 server of the stage tests), and
# KubeRay's operator (the real controller that turns our RayJobs into RayClusters); and for the
# node tier (tests/node) the node's own parts: kubelet, kube-proxy and kube-scheduler from the
# same k8s.io/kubernetes, the CNI plugins, CoreDNS, and the pause binary (gcc, from the
# kubernetes module's own build/pause/linux/pause.c), and KServe's controller (cmd/manager).
# Called by the test fixtures, by `make controlplane` and by `make helm`; a warm call returns
# at once.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io staging module
# with a local path. So we build from a throwaway wrapper module that requires it and replaces
# each staging module with its published v0.Y.Z instead.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
HELM_VERSION=${HELM_VERSION:-v3.19.5}
VERSITYGW_VERSION=${VERSITYGW_VERSION:-v1.8.0}
KUBERAY_VERSION=${KUBERAY_VERSION:-v1.5.0}
KSERVE_VERSION=${KSERVE_VERSION:-v0.17.0}
CNI_VERSION=${CNI_VERSION:-v1.10.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
CACHE=${FMFORGE_CACHE:-$HOME/.cache/fmforge}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

what=${1:-all}
staging_version="v0${K8S_VERSION#v1}"   # v1.36.3 -> v0.36.3

# One build at a time: two test runs (or a run and `make node`) building the same binary into the
# same cache would move each other's half-written files. The second waits, then finds it built.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-controlplane.lock"
flock -n 9 || { echo "Waiting for another build-controlplane.sh to finish ($CACHE/.build-controlplane.lock)" >&2; flock 9; }

# wrapper_build OUT MODULE VERSION LOCAL_REPLACE_VERSION PKG...
# Builds PKGs of MODULE@VERSION from a throwaway wrapper module in which every replace
# directive of MODULE that points at a local path (`=> ./staging/...`, `=> ../api`) points at
# the published module at LOCAL_REPLACE_VERSION instead.
wrapper_build() {
  local out=$1 module=$2 version=$3 rversion=$4; shift 4
  local work; work=$(mktemp -d)
  mkdir -p "$out"
  (
    cd "$work"
    go mod init fmforge.io/controlplane-wrapper >/dev/null 2>&1
    go mod download -json "$module@$version" >/dev/null
    local modfile
    modfile=$(go env GOMODCACHE)/cache/download/$module/@v/$version.mod
    go mod edit -require="$module@$version"
    for m in $(grep -v FORBIDDEN "$modfile" | sed -n 's#^[[:space:]]*\(replace[[:space:]]\+\)\?\([a-z0-9./-]*\) => \.\{1,2\}/.*#\2#p'); do
      go mod edit -replace="$m=$m@$rversion"
    done
    { echo '//go:build tools'; echo; echo 'package tools'; echo; echo 'import ('
      for p in "$@"; do echo "	_ \"$p\""; done; echo ')'; } > tools.go
    go mod tidy -e >&2
    for p in "$@"; do
      local bin=${p##*/}
      [[ $p == go.etcd.io/etcd/server/v3 ]] && bin=etcd
      echo "Building $bin from $module@$version" >&2
      go build -trimpath -ldflags "${LDFLAGS:--s -w}" -o "$out/$bin.tmp" "$p" >&2
      mv "$out/$bin.tmp" "$out/$bin"
    done
  )
  local rc=$?
  rm -rf "$work"
  return $rc
}

build_k8s() {
  local out="$CACHE/k8s-$K8S_VERSION"
  if [[ -x $out/kube-apiserver && -x $out/kube-controller-manager && -x $out/kubectl ]]; then
    echo "$out"; return
  fi
  local v=k8s.io/component-base/version minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  LDFLAGS="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" \
    wrapper_build "$out" k8s.io/kubernetes "$K8S_VERSION" "$staging_version" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl
  echo "$out"
}

# The node's binaries, kept apart from the control plane's so that a warm control plane does not
# need them (and `make test` without the node tier never builds them).
build_k8s_node() {
  local out="$CACHE/k8s-node-$K8S_VERSION"
  if [[ -x $out/kubelet && -x $out/kube-proxy && -x $out/kube-scheduler ]]; then
    echo "$out"; return
  fi
  local v=k8s.io/component-base/version minor
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  LDFLAGS="-s -w -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" \
    wrapper_build "$out" k8s.io/kubernetes "$K8S_VERSION" "$staging_version" \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubelet
  echo "$out"
}

build_cni() {
  local out="$CACHE/cni-$CNI_VERSION"
  if [[ -x $out/bridge && -x $out/host-local && -x $out/loopback && -x $out/portmap ]]; then
    echo "$out"; return
  fi
  mkdir -p "$out"
  echo "Building the CNI plugins $CNI_VERSION" >&2
  local m=github.com/containernetworking/plugins/plugins
  GOBIN="$out" go install -trimpath -ldflags "-s -w" "$m/main/bridge@$CNI_VERSION" \
    "$m/ipam/host-local@$CNI_VERSION" "$m/main/loopback@$CNI_VERSION" "$m/meta/portmap@$CNI_VERSION" >&2
  echo "$out"
}

build_coredns() {
  local out="$CACHE/coredns-$COREDNS_VERSION"
  if [[ -x $out/coredns ]]; then echo "$out"; return; fi
  mkdir -p "$out"
  echo "Building coredns $COREDNS_VERSION" >&2
  GOBIN="$out" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION" >&2
  echo "$out"
}

# The pod sandbox's process, as Kubernetes builds it (build/pause/Makefile): static, with gcc.
build_pause() {
  local out="$CACHE/pause-$K8S_VERSION"
  if [[ -x $out/pause ]]; then echo "$out"; return; fi
  mkdir -p "$out"
  local dir
  dir=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's#^[[:space:]]*"Dir": "\(.*\)",#\1#p')
  echo "Building pause from k8s.io/kubernetes@$K8S_VERSION build/pause/linux/pause.c" >&2
  gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION-fmforge" -o "$out/pause.tmp" "$dir/build/pause/linux/pause.c" >&2
  strip "$out/pause.tmp"
  mv "$out/pause.tmp" "$out/pause"
  echo "$out"
}

build_etcd() {
  local out="$CACHE/etcd-$ETCD_VERSION"
  if [[ -x $out/etcd ]]; then echo "$out"; return; fi
  # The module root is etcd's main package; its go.mod replaces the sibling etcd modules with
  # local paths, so it is built through a wrapper too, with those at the same version.
  wrapper_build "$out" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "$ETCD_VERSION" go.etcd.io/etcd/server/v3
  echo "$out"
}

build_helm() {
  local out="$CACHE/helm-$HELM_VERSION"
  if [[ -x $out/helm ]]; then echo "$out"; return; fi
  mkdir -p "$out"
  echo "Building helm $HELM_VERSION" >&2
  # Stamp the version and the Kubernetes version helm assumes offline (`helm template`), as
  # helm's own Makefile does; unstamped, helm assumes Kubernetes v1.20.
  local kminor
  kminor=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" >/dev/null && \
    sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' \
    "$(go env GOMODCACHE)/cache/download/helm.sh/helm/v3/@v/$HELM_VERSION.mod")
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld="$ld -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$kminor"
  done
  GOBIN="$out" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
  echo "$out"
}

build_versitygw() {
  local out="$CACHE/versitygw-$VERSITYGW_VERSION"
  if [[ -x $out/versitygw ]]; then echo "$out"; return; fi
  mkdir -p "$out"
  echo "Building versitygw $VERSITYGW_VERSION" >&2
  GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION" >&2
  echo "$out"
}

build_kuberay() {
  local out="$CACHE/kuberay-$KUBERAY_VERSION"
  if [[ -x $out/ray-operator ]]; then echo "$out"; return; fi
  mkdir -p "$out"
  echo "Building ray-operator $KUBERAY_VERSION" >&2
  # The module root is the operator's main package and its go.mod has no local replaces.
  GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" >&2
  echo "$out"
}

# KServe's controller (cmd/manager: the InferenceService, ServingRuntime and TrainedModel
# reconcilers and their webhooks). The proxy serves the exact version but lists none; its go.mod
# has replace directives, which `go install pkg@version` refuses, so it is built inside a copy of
# the module itself, with the module's own go.mod and go.sum.
build_kserve() {
  local out="$CACHE/kserve-$KSERVE_VERSION"
  if [[ -x $out/manager ]]; then echo "$out"; return; fi
  mkdir -p "$out"
  local dir work
  dir=$(go mod download -json "github.com/kserve/kserve@$KSERVE_VERSION" | sed -n 's#^[[:space:]]*"Dir": "\(.*\)",#\1#p')
  work=$(mktemp -d)
  # only what the Go build reads (the module also ships 200 MB of Python, docs and charts)
  cp -r "$dir/go.mod" "$dir/go.sum" "$dir/cmd" "$dir/pkg" "$work/"
  chmod -R u+w "$work"
  echo "Building KServe's manager from github.com/kserve/kserve@$KSERVE_VERSION" >&2
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$out/manager.tmp" ./cmd/manager >&2)
  local rc=$?
  rm -rf "$work"
  ((rc == 0)) || return $rc
  mv "$out/manager.tmp" "$out/manager"
  echo "$out"
}

case "$what" in
  k8s) build_k8s ;;
  etcd) build_etcd ;;
  helm) build_helm ;;
  versitygw) build_versitygw ;;
  kuberay) build_kuberay ;;
  kserve) build_kserve ;;
  k8s-node) build_k8s_node ;;
  cni) build_cni ;;
  coredns) build_coredns ;;
  pause) build_pause ;;
  all) build_etcd; build_k8s; build_helm ;;
  # One at a time: each Go build takes both cores of a small machine.
  node) build_etcd; build_k8s; build_helm; build_kuberay; build_k8s_node; build_cni; build_coredns; build_pause; build_kserve ;;
  *) echo "usage: $0 [k8s|etcd|helm|versitygw|kuberay|kserve|k8s-node|cni|coredns|pause|all|node]" >&2; exit 2 ;;
esac
