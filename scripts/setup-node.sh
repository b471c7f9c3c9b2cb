#!/usr/bin/env bash
# Installs and builds what a real Kubernetes node needs in the tests (tests/common/real_node.rs),
# idempotently, into ${PGFLIP_NODE_CACHE:-$HOME/.cache/pgflip/node}:
#   - Debian's containerd, runc, CNI plugins, iptables, nftables, mmdebstrap and buildah;
#   - kubelet and kube-proxy: scripts/setup-kube.sh builds them with the control plane, at
#     its version (v1.34.4, the newest kubelet these machines run), into its cache;
#   - CoreDNS (the cluster's DNS), `go install`ed from the Go module proxy;
#   - images, as OCI layout tarballs for `ctr images import` (no registry is reachable):
#     images/pause.tar (registry.k8s.io/pause:3.9, a static C program: images/pause/pause.c),
#     images/coredns.tar (registry.k8s.io/coredns/coredns:<version>, the static binary alone),
#     images/debian.tar (debian:bookworm-slim, the base buildah builds pgflip's image on from
#     the repository's Dockerfile: tests/common/real_node.rs) and images/postgres.tar (docker.io/library/postgres:15, :16, :17 and :18: the
#     toolchain's binaries on a Debian bookworm root made by mmdebstrap, with the entrypoint
#     images/postgres/docker-entrypoint.sh). The images are rebuilt when the toolchain's
#     versions or these files change (a stamp keyed by their hashes).
# Usage: scripts/setup-node.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
cache=${PGFLIP_NODE_CACHE:-$HOME/.cache/pgflip/node}
toolchain=${PGFLIP_TOOLCHAIN:-$repo/.toolchain}
COREDNS_VERSION=${PGFLIP_COREDNS_VERSION:-v1.15.0}
DEBIAN_MIRROR=${PGFLIP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
force=${1:-}
log() { printf '[node] %s\n' "$*"; }

# 1. Debian packages.
packages=(containerd runc containernetworking-plugins iptables nftables mmdebstrap buildah)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. kubelet and kube-proxy, with the control plane (a no-op when it is built; --force here
#    rebuilds the images only: scripts/setup-kube.sh --force rebuilds Kubernetes).
bash scripts/setup-kube.sh

# 3. CoreDNS: a plain main module, no replace lines, so `go install` builds it.
coredns_dir="$cache/coredns-$COREDNS_VERSION"
if [ ! -x "$coredns_dir/coredns" ]; then
  log "go install github.com/coredns/coredns@$COREDNS_VERSION"
  t=$(date +%s)
  GOFLAGS=-mod=mod CGO_ENABLED=0 GOBIN="$coredns_dir" nice -n 19 \
    go install -trimpath -ldflags="-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  log "  built coredns in $(( $(date +%s) - t ))s"
fi

# 4. Images.
images="$cache/images"
majors=(15 16 17 18)
declare -A install=(
  [15]=/usr/lib/postgresql/15
  [16]=$toolchain/pg16
  [17]=$toolchain/pg17full
  [18]=$toolchain/pg18full
)
key=$( {
  cat scripts/setup-node.sh scripts/oci-image.py images/postgres/docker-entrypoint.sh images/pause/pause.c
  for m in "${majors[@]}"; do "${install[$m]}/bin/postgres" --version; done
  echo "coredns $COREDNS_VERSION"
} | sha256sum | cut -c1-16)
if [ "$force" != "--force" ] && [ -f "$images/stamp" ] && [ "$(cat "$images/stamp")" = "$key" ] \
   && [ -f "$images/pause.tar" ] && [ -f "$images/coredns.tar" ] && [ -f "$images/debian.tar" ] \
   && [ -f "$images/postgres.tar" ]; then
  log "images up to date ($key): $images"
  exit 0
fi
t0=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/pgflip-images-XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$images"

# The pause image: the sandbox's init, reaping orphans until it is told to stop.
mkdir -p "$work/pause"
gcc -static -Os -o "$work/pause/pause" images/pause/pause.c
tar --numeric-owner --owner=0 --group=0 -C "$work/pause" -cf "$work/pause-layer.tar" pause
python3 scripts/oci-image.py "$images/pause.tar.tmp" \
  registry.k8s.io/pause:3.9 '{"Entrypoint":["/pause"]}' "$work/pause-layer.tar"
mv "$images/pause.tar.tmp" "$images/pause.tar"

mkdir -p "$work/coredns"
install -m 0755 "$coredns_dir/coredns" "$work/coredns/coredns"
tar --numeric-owner --owner=0 --group=0 -C "$work/coredns" -cf "$work/coredns-layer.tar" coredns
python3 scripts/oci-image.py "$images/coredns.tar.tmp" \
  "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" '{"Entrypoint":["/coredns"]}' "$work/coredns-layer.tar"
mv "$images/coredns.tar.tmp" "$images/coredns.tar"

# debian:bookworm-slim: Debian's minbase (apt included, its sources the Debian mirror).
log "mmdebstrap bookworm minbase (debian:bookworm-slim)"
mmdebstrap --quiet --variant=minbase bookworm "$work/debian-root.tar" "$DEBIAN_MIRROR"
python3 scripts/oci-image.py "$images/debian.tar.tmp" docker.io/library/debian:bookworm-slim \
  '{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["bash"]}' \
  "$work/debian-root.tar" >/dev/null
mv "$images/debian.tar.tmp" "$images/debian.tar"

# The Debian root every PostgreSQL image shares (one layer): Essential packages (sh,
# coreutils, util-linux's setpriv, sed), the time zone data the servers read (built with
# the system's, as the official images are: without it no session can set TimeZone), and
# the postgres user the official images have.
log "mmdebstrap bookworm (the images' Debian root)"
mmdebstrap --quiet --variant=essential --include=tzdata \
  --customize-hook='echo "postgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh" >> "$1/etc/passwd"' \
  --customize-hook='echo "postgres:x:999:" >> "$1/etc/group"' \
  --customize-hook='mkdir -p "$1/var/lib/postgresql" "$1/var/run/postgresql" && chown 999:999 "$1/var/lib/postgresql" "$1/var/run/postgresql"' \
  bookworm "$work/base.tar" "$DEBIAN_MIRROR"
mkdir -p "$work/base"
tar -C "$work/base" -xf "$work/base.tar"

# Every shared library any major's programs load that the root lacks, in one layer every
# PostgreSQL image has, under /usr/lib/x86_64-linux-gnu by the name they ask for (whatever
# their RPATH): an image's programs then also run another major's binaries, which the
# physical copy in Kubernetes mode mounts into green's pod for pg_upgrade (as the official
# images, all built on one Debian release, allow).
elf_files() { find "$@" -type f \( -perm -u+x -o -name '*.so*' \) -exec sh -c 'head -c4 "$1" | grep -q ELF' _ {} \; -print; }
mkdir -p "$work/libs"
# The readiness probe runs pg_isready; the npm build of 16 is a server only (pg_isready 17
# speaks to any major).
probe_of() {
  local own; own=$(readlink -f "${install[$1]}")/bin/pg_isready
  if [ -x "$own" ]; then echo "$own"; else echo "$(readlink -f "${install[17]}")/bin/pg_isready"; fi
}
for m in "${majors[@]}"; do
  # ldd where the programs were installed: their RPATHs may point outside the copied tree.
  elf_files "$(readlink -f "${install[$m]}")" "$(probe_of "$m")"
done | sort -u | while read -r f; do ldd "$f" 2>/dev/null || true; done \
  | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u | while read -r name path; do
    [ -e "$work/base/lib/x86_64-linux-gnu/$name" ] || [ -e "$work/base/usr/lib/x86_64-linux-gnu/$name" ] \
      || [ -e "$work/libs/usr/lib/x86_64-linux-gnu/$name" ] \
      || install -D -m 0644 "$path" "$work/libs/usr/lib/x86_64-linux-gnu/$name"
  done
tar --numeric-owner --owner=0 --group=0 -C "$work/libs" -cf "$work/libs.tar" .

# One layer per major: its installation under /usr/lib/postgresql/<major> (15, from Debian,
# keeps Debian's paths: its share directory too) and the entrypoint.
refs=()
for m in "${majors[@]}"; do
  layer="$work/pg$m"
  home=/usr/lib/postgresql/$m
  src=$(readlink -f "${install[$m]}")
  mkdir -p "$layer$home" "$layer/usr/local/bin"
  cp -a "$src/." "$layer$home/"
  if [ "$m" = 15 ]; then
    mkdir -p "$layer/usr/share/postgresql"
    cp -a /usr/share/postgresql/15 "$layer/usr/share/postgresql/"
  fi
  probe=$(probe_of "$m")
  [ "$probe" = "$src/bin/pg_isready" ] || install -m 0755 "$probe" "$layer$home/bin/"
  install -m 0755 images/postgres/docker-entrypoint.sh "$layer/usr/local/bin/"
  tar --numeric-owner --owner=0 --group=0 -C "$layer" -cf "$layer.tar" .
  config=$(printf '{"Entrypoint":["docker-entrypoint.sh"],"Cmd":["postgres"],"Env":["PATH=%s/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","PGDATA=/var/lib/postgresql/data","PG_MAJOR=%s"],"StopSignal":"SIGINT","ExposedPorts":{"5432/tcp":{}}}' "$home" "$m")
  refs+=("docker.io/library/postgres:$m" "$config" "$work/base.tar,$work/libs.tar,$layer.tar")
  log "postgres:$m: $(du -sh "$layer" | cut -f1) over the root and $(du -sh "$work/libs" | cut -f1) of libraries"
done
python3 scripts/oci-image.py "$images/postgres.tar.tmp" "${refs[@]}" >/dev/null
mv "$images/postgres.tar.tmp" "$images/postgres.tar"
echo "$key" > "$images/stamp"
log "images built in $(( $(date +%s) - t0 ))s: $(du -sh "$images/postgres.tar" | cut -f1) ($images)"
