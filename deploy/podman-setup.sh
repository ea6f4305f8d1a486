#!/usr/bin/env bash
# Make this machine able to run docker-compose.yml without a Docker engine: Debian's podman
# with runc, podman-compose, and a local base image built by debootstrap (no container registry
# is reachable here, so every FROM must be a local tag). Idempotent: each step is skipped when
# already done, and the debootstrap rootfs tarball is cached.
#
#   deploy/podman-setup.sh            # then:  . "${OPD_PODMAN_CACHE:-$HOME/.cache/opd-podman}/env"
#
# Needs root (apt-get, debootstrap, rootful podman). Tested on Debian 12 (bookworm), 2 cores.
# Environment:
#   OPD_PODMAN_CACHE   where everything lives (default ~/.cache/opd-podman): the containers.conf,
#                      storage.conf, image storage, the rootfs tarball and the podman-compose venv
#   OPD_BASE_IMAGE     tag of the base image to build (default localhost/debian-py)
#   OPD_DEBIAN_MIRROR  mirror for debootstrap (default: the first one apt uses, else deb.debian.org)
set -euo pipefail

CACHE="${OPD_PODMAN_CACHE:-$HOME/.cache/opd-podman}"
BASE_IMAGE="${OPD_BASE_IMAGE:-localhost/debian-py}"
mkdir -p "$CACHE"
log() { echo "podman-setup: $*" >&2; }

# 1. system packages --------------------------------------------------------------------------
need=()
for cmd_pkg in podman:podman runc:runc debootstrap:debootstrap docker-compose:docker-compose; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg##*:}")
done
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q "${need[@]}" python3-venv >&2
fi

# 2. podman configuration: runc (crun fails here on setrlimit / hybrid cgroups), ulimits that
#    the runtime may set, and storage under the cache directory --------------------------------
cat >"$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
EOF
cat >"$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "/tmp/opd-podman-run-$(printf %s "$CACHE" | md5sum | cut -c1-8)"
EOF
cat >"$CACHE/env" <<EOF
export CONTAINERS_CONF="$CACHE/containers.conf"
export CONTAINERS_STORAGE_CONF="$CACHE/storage.conf"
export PATH="$CACHE/venv/bin:\$PATH"
EOF
# shellcheck disable=SC1091
. "$CACHE/env"

# 3. podman-compose (PyPI) in its own venv ------------------------------------------------------
if ! "$CACHE/venv/bin/podman-compose" version >/dev/null 2>&1; then
    log "installing podman-compose into $CACHE/venv"
    rm -rf "$CACHE/venv"
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q podman-compose >&2
fi

# 4. the base image: debootstrap (tarball cached) + podman import ------------------------------
if ! podman image exists "$BASE_IMAGE"; then
    tarball="$CACHE/rootfs-bookworm-py.tar"
    if [ ! -s "$tarball" ]; then
        mirror="${OPD_DEBIAN_MIRROR:-}"
        if [ -z "$mirror" ]; then
            mirror=$(grep -rhoE '(URIs:|^deb) +https?://[^ ]+/debian/?( |$)' \
                /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
                grep -oE 'https?://[^ ]+' | head -n1 || true)
            mirror="${mirror:-http://deb.debian.org/debian}"
        fi
        log "debootstrap bookworm from $mirror (about a minute)"
        root="$(mktemp -d /tmp/opd-rootfs.XXXXXX)"
        trap 'rm -rf "$root"' EXIT
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$root" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
            { tail -n 30 "$CACHE/debootstrap.log" >&2; exit 1; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
        trap - EXIT
    fi
    log "podman import $tarball -> $BASE_IMAGE"
    podman import --quiet "$tarball" "$BASE_IMAGE" >/dev/null
fi
log "ready: . $CACHE/env; $(podman-compose version 2>/dev/null | head -n1)"
