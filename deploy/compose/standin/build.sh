#!/usr/bin/env bash
# Build stand-ins for the two images compose.yaml needs from a registry, python:3.11-slim
# and redis:7, from Debian bookworm's packages alone (a Debian mirror, no image registry):
#
#   base    debootstrap --variant=minbase bookworm with python3, python3-venv,
#           python-is-python3 (the `python` -> `python3` link) and ca-certificates,
#           imported with `docker import` (bookworm's Python is 3.11)
#   python  the base plus this host's CA bundle (pip in `docker build` trusts what the
#           host trusts)
#   redis   the python stand-in plus bookworm's redis-server (7.0) and an entrypoint that,
#           like the official image's, turns protected mode off (redis-entrypoint.sh)
#
# Usage (as root, with docker, debootstrap and a running Docker engine):
#   deploy/compose/standin/build.sh                      # tags python:3.11-slim and redis:7
#   PYTHON_TAG=me/python:3.11-slim REDIS_TAG=me/redis:7 deploy/compose/standin/build.sh
#
# Environment:
#   PYTHON_TAG, REDIS_TAG  the tags to give (defaults: python:3.11-slim, redis:7)
#   BASE_TAG               the imported base (default: examhook-standin/bookworm:minbase)
#   DEBIAN_MIRROR          default http://deb.debian.org/debian
#   CA_BUNDLE              default /etc/ssl/certs/ca-certificates.crt
#   STANDIN_CACHE_DIR      keep the debootstrap tarball there and reuse it (optional)
#   STANDIN_LABEL          a label (key=value) put on every image built here (optional)
#
# The legacy builder is used (DOCKER_BUILDKIT=0): it needs nothing from a registry, where
# BuildKit may want its Dockerfile frontend image.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
PYTHON_TAG="${PYTHON_TAG:-python:3.11-slim}"
REDIS_TAG="${REDIS_TAG:-redis:7}"
BASE_TAG="${BASE_TAG:-examhook-standin/bookworm:minbase}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
STANDIN_CACHE_DIR="${STANDIN_CACHE_DIR:-}"
STANDIN_LABEL="${STANDIN_LABEL:-org.examhook.standin=1}"
SUITE=bookworm
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
export DOCKER_BUILDKIT=0

say() { printf 'standin: %s\n' "$*"; }

work="$(mktemp -d /var/tmp/examhook-standin.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# ---- base tarball: debootstrap, or the cached one ----------------------------------------
key="$(printf '%s %s %s %s' "$SUITE" minbase "$PACKAGES" "$DEBIAN_MIRROR" | sha256sum | cut -c1-12)"
tarball=""
if [ -n "$STANDIN_CACHE_DIR" ] && mkdir -p "$STANDIN_CACHE_DIR" 2>/dev/null && [ -w "$STANDIN_CACHE_DIR" ]; then
  tarball="$STANDIN_CACHE_DIR/$SUITE-minbase-$key.tar"
  # Refresh a month-old base: bookworm's point releases carry security fixes.
  find "$STANDIN_CACHE_DIR" -maxdepth 1 -name "$SUITE-minbase-*.tar" -mtime +30 -delete 2>/dev/null || true
fi
start=$SECONDS
if [ -n "$tarball" ] && [ -s "$tarball" ]; then
  say "base: cached $tarball"
else
  command -v debootstrap >/dev/null || { echo "standin: debootstrap is not installed" >&2; exit 1; }
  rootfs="$work/rootfs"
  say "base: debootstrap $SUITE (minbase + $PACKAGES) from $DEBIAN_MIRROR"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$DEBIAN_MIRROR" \
      >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    echo "standin: debootstrap failed" >&2
    exit 1
  fi
  # What an image does not need: downloaded packages, package lists, docs.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* \
         "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/*
  [ -x "$rootfs/usr/bin/python" ] || { echo "standin: no python link in the base" >&2; exit 1; }
  out="${tarball:-$work/base.tar}"
  tar --numeric-owner -C "$rootfs" -cf "$out.part" .
  mv "$out.part" "$out"
  tarball="$out"
  rm -rf "$rootfs"
fi
say "base: ready in $((SECONDS - start)) s"

# ---- images --------------------------------------------------------------------------------
start=$SECONDS
docker import --change "LABEL $STANDIN_LABEL" --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
  "$tarball" "$BASE_TAG" >/dev/null
say "base: imported as $BASE_TAG in $((SECONDS - start)) s"

start=$SECONDS
ctx="$work/context"
mkdir -p "$ctx"
cp "$here/python.Dockerfile" "$here/redis.Dockerfile" "$here/redis-entrypoint.sh" "$ctx/"
cp "$CA_BUNDLE" "$ctx/ca-certificates.crt"
docker build -q --label "$STANDIN_LABEL" --build-arg BASE_IMAGE="$BASE_TAG" \
  -f "$ctx/python.Dockerfile" -t "$PYTHON_TAG" "$ctx" >/dev/null
say "python: $PYTHON_TAG ($(docker run --rm "$PYTHON_TAG" python --version)) in $((SECONDS - start)) s"

start=$SECONDS
# --network host: apt-get reaches the mirror the way the host does.
if ! docker build -q --network host --label "$STANDIN_LABEL" --build-arg BASE_IMAGE="$PYTHON_TAG" \
    -f "$ctx/redis.Dockerfile" -t "$REDIS_TAG" "$ctx" >"$work/redis-build.log" 2>&1; then
  tail -n 20 "$work/redis-build.log" >&2
  echo "standin: building the redis stand-in failed" >&2
  exit 1
fi
say "redis: $REDIS_TAG ($(docker run --rm --entrypoint redis-server "$REDIS_TAG" --version | cut -d' ' -f1-3)) in $((SECONDS - start)) s"
