#!/usr/bin/env bash
# The node tier's images, built the way users build them (`podman build -f images/X/Containerfile .`;
# here with buildah, the same engine, from Debian's package), into a container storage of our own
# under $FMFORGE_CACHE. The node streams each into containerd (`stream NAME | ctr images import -`)
# when containerd lacks that build: no archive is written (the runtime's was 7.6 GB).
#
#   base      the FROM image of both Containerfiles (docker.io/library/python:3.11-slim) cannot
#             be pulled here, so it is made locally: a Debian bookworm root filesystem from
#             mmdebstrap with Debian's Python 3.11, tagged with that name. Never pushed anywhere.
#   pause     the pod sandbox (containerd's sandbox_image): the static pause binary built by
#             build-controlplane.sh pause, alone in a one-layer image.
#   coredns   the cluster DNS: the CoreDNS binary alone in a one-layer image.
#   kuberay   KubeRay's operator (built by build-controlplane.sh kuberay) alone in a one-layer image.
#   kserve    KServe's controller (cmd/manager, built by build-controlplane.sh kserve) likewise.
#   runtime   images/runtime/Containerfile, `--pull=never`
#   operator  images/operator/Containerfile, `--pull=never`
#
# Installs what it needs from Debian's packages when missing (containerd, runc, buildah,
# mmdebstrap, iptables, conntrack). Prints one line per image: NAME IMAGE-ID SECONDS. pip's cache
# is a cache mount of the Containerfiles, kept under $FMFORGE_CACHE/buildah-tmp between builds.
#
#   tests/node/build-images.sh [base|pause|coredns|kuberay|kserve|runtime|operator|all|prune]
#   tests/node/build-images.sh stream NAME     the image as a docker-archive on stdout
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${FMFORGE_CACHE:-$HOME/.cache/fmforge}
K8S_VERSION=${K8S_VERSION:-v1.36.3}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
BASE_NAME=docker.io/library/python:3.11-slim
PAUSE_NAME=localhost/fmforge/pause:$K8S_VERSION
COREDNS_NAME=localhost/fmforge/coredns:$COREDNS_VERSION
KUBERAY_VERSION=${KUBERAY_VERSION:-v1.5.0}
KUBERAY_NAME=localhost/fmforge/kuberay-operator:$KUBERAY_VERSION
KSERVE_VERSION=${KSERVE_VERSION:-v0.17.0}
KSERVE_NAME=localhost/fmforge/kserve-controller:$KSERVE_VERSION
RUNTIME_NAME=${RUNTIME_IMAGE:-localhost/fmforge/runtime:dev}
OPERATOR_NAME=${OPERATOR_IMAGE:-localhost/fmforge/operator:dev}
STORE=$CACHE/containers
mkdir -p "$STORE" "$CACHE/buildah-tmp"
# buildah keeps cache mounts (pip's cache) and its temporary files under $TMPDIR.
export TMPDIR=$CACHE/buildah-tmp
BUILDAH=(buildah --root "$STORE/storage" --runroot "$STORE/run" --storage-driver overlay)

what=${1:-all}

# One build at a time (two test runs building the same tag would race on it); `stream` only reads.
if [[ $what != stream ]]; then
  exec 9>"$CACHE/.build-images.lock"
  flock -n 9 || { echo "Waiting for another build-images.sh to finish ($CACHE/.build-images.lock)" >&2; flock 9; }
fi

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  ((${#missing[@]})) || return 0
  echo "Installing ${missing[*]} (Debian packages)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

image_id() { "${BUILDAH[@]}" images --noheading --no-trunc --format '{{.ID}}' "$1" 2>/dev/null | head -1; }

report() { local name=$1 t0=$2; echo "$name $(image_id "$name") $(( $(date +%s) - t0 ))"; }

# The recipe of the base is in its label: a changed recipe makes it again.
BASE_PACKAGES="python3 python3-venv python-is-python3 ca-certificates"
base_recipe() { echo "bookworm minbase $BASE_PACKAGES v1" | sha256sum | cut -c1-16; }

build_base() {
  local t0; t0=$(date +%s)
  apt_install buildah mmdebstrap
  local recipe; recipe=$(base_recipe)
  if [[ $("${BUILDAH[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "fmforge.base"}}' \
          "$BASE_NAME" 2>/dev/null) == "$recipe" ]]; then
    report "$BASE_NAME" "$t0"; return
  fi
  local tar="$CACHE/base-bookworm.tar"
  rm -rf "$tar"
  echo "Making the base: mmdebstrap bookworm ($BASE_PACKAGES)" >&2
  # No documentation, man pages or locales but C.UTF-8, as slim images do.
  mmdebstrap --variant=minbase --include="${BASE_PACKAGES// /,}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --aptopt='APT::Install-Recommends "false"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    --format=tar bookworm "$tar" http://deb.debian.org/debian >&2
  local c; c=$("${BUILDAH[@]}" from scratch)
  "${BUILDAH[@]}" add "$c" "$tar" / >/dev/null
  "${BUILDAH[@]}" config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd python3 --label fmforge.base="$recipe" \
    --label org.opencontainers.image.description="fmforge's local stand-in for $BASE_NAME: Debian bookworm (mmdebstrap) with Debian's Python 3.11" \
    "$c"
  "${BUILDAH[@]}" commit -q --rm "$c" "$BASE_NAME" >/dev/null
  rm -f "$tar"
  report "$BASE_NAME" "$t0"
}

# one_binary NAME BINARY ENTRYPOINT-ARGS...: an image holding one static binary at /.
one_binary() {
  local name=$1 bin=$2; shift 2
  local t0; t0=$(date +%s)
  local digest; digest=$(sha256sum "$bin" | cut -c1-16)
  if [[ $("${BUILDAH[@]}" inspect --type image --format '{{index .OCIv1.Config.Labels "fmforge.binary"}}' \
          "$name" 2>/dev/null) != "$digest" ]]; then
    local c; c=$("${BUILDAH[@]}" from scratch)
    "${BUILDAH[@]}" copy --chmod 0755 "$c" "$bin" "/$(basename "$bin")" >/dev/null
    "${BUILDAH[@]}" config --entrypoint "$(printf '"%s",' "$@" | sed 's/^/[/; s/,$/]/')" --user 65535:65535 \
      --label fmforge.binary="$digest" "$c"
    "${BUILDAH[@]}" commit -q --rm "$c" "$name" >/dev/null
  fi
  report "$name" "$t0"
}

build_pause() {
  apt_install buildah
  local dir; dir=$("$ROOT/tests/cluster/build-controlplane.sh" pause)
  one_binary "$PAUSE_NAME" "$dir/pause" /pause
}

build_coredns() {
  apt_install buildah
  local dir; dir=$("$ROOT/tests/cluster/build-controlplane.sh" coredns)
  one_binary "$COREDNS_NAME" "$dir/coredns" /coredns
}

build_kuberay() {
  apt_install buildah
  local dir; dir=$("$ROOT/tests/cluster/build-controlplane.sh" kuberay)
  one_binary "$KUBERAY_NAME" "$dir/ray-operator" /ray-operator
}

build_kserve() {
  apt_install buildah
  local dir; dir=$("$ROOT/tests/cluster/build-controlplane.sh" kserve)
  one_binary "$KSERVE_NAME" "$dir/manager" /manager
}

# containerfile NAME FILE: `podman build -f FILE .` from the repository root, as users do.
containerfile() {
  local name=$1 file=$2 t0; t0=$(date +%s)
  apt_install buildah
  [[ -n $(image_id "$BASE_NAME") ]] || build_base >/dev/null
  # The build's RUN steps see the host's pip configuration and CA bundle (read-only, never in a
  # layer): where a proxy re-signs TLS, as on this project's machines, pip needs them.
  local vols=()
  for f in /etc/pip.conf /etc/ssl/certs/ca-certificates.crt; do [[ -f $f ]] && vols+=(-v "$f:$f:ro"); done
  (cd "$ROOT" && "${BUILDAH[@]}" bud --pull=never --layers --network=host "${vols[@]}" -f "$file" -t "$name" . >&2)
  report "$name" "$t0"
}

case "$what" in
  base) build_base ;;
  pause) build_pause ;;
  coredns) build_coredns ;;
  kuberay) build_kuberay ;;
  kserve) build_kserve ;;
  runtime) containerfile "$RUNTIME_NAME" images/runtime/Containerfile ;;
  operator) containerfile "$OPERATOR_NAME" images/operator/Containerfile ;;
  # Disk: every change of the runtime's dependencies leaves a 7.6 GB layer behind in the storage,
  # and containerd keeps every runtime it imported. This removes the build containers, the
  # untagged images (buildah's layer cache too: the next build installs the dependencies again,
  # from pip's kept files), the node's containerd root (imported again on the next start) and
  # the archives earlier versions of this script wrote.
  prune) "${BUILDAH[@]}" rm --all >/dev/null; "${BUILDAH[@]}" rmi --prune >/dev/null
         rm -rf "$CACHE/node/containerd" "$CACHE/images"; du -sh "$STORE" ;;
  # Uncompressed (containerd unpacks it at once), straight into the reader: never on disk.
  stream) [[ -n ${2:-} ]] || { echo "usage: $0 stream NAME" >&2; exit 2; }
          exec "${BUILDAH[@]}" push -q --disable-compression "$2" "docker-archive:/dev/stdout:$2" ;;
  tools) apt_install containerd runc buildah mmdebstrap iptables conntrack ;;
  all) apt_install containerd runc buildah mmdebstrap iptables conntrack
       build_base; build_pause; build_coredns; build_kuberay; build_kserve
       containerfile "$OPERATOR_NAME" images/operator/Containerfile
       containerfile "$RUNTIME_NAME" images/runtime/Containerfile ;;
  *) echo "usage: $0 [base|pause|coredns|kuberay|kserve|runtime|operator|tools|all|prune|stream NAME]" >&2; exit 2 ;;
esac
