#!/usr/bin/env bash
# Builds the container image of Cattery itself (deploy/docker/Dockerfile) from a binary built on
# the host, with no image pulled: the base is a local Debian root file system
# (cattery-test/rootfs:bookworm, built here by scripts/docker-images.sh rootfs when missing).
#
# usage: scripts/cattery-image.sh [--bin PATH] [--tag TAG] [--base IMAGE]
#   --bin   default target/release/cattery if it exists, else target/debug/cattery
#   --tag   default cattery:local
#   --base  default cattery-test/rootfs:bookworm
# Prints the tag.
set -euo pipefail
cd "$(dirname "$0")/.."
DOCKER="${DOCKER:-/usr/bin/docker}"
bin=""
tag="cattery:local"
base="cattery-test/rootfs:bookworm"
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    *) echo "usage: $0 [--bin PATH] [--tag TAG] [--base IMAGE]" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  bin=target/release/cattery
  [ -x "$bin" ] || bin=target/debug/cattery
fi
[ -x "$bin" ] || { echo "no cattery binary at $bin: cargo build -p cattery" >&2; exit 1; }
if ! "$DOCKER" image inspect "$base" >/dev/null 2>&1; then
  if [ "$base" = "cattery-test/rootfs:bookworm" ]; then
    scripts/docker-images.sh rootfs >&2
  else
    echo "base image $base not found locally" >&2; exit 1
  fi
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp deploy/docker/Dockerfile "$ctx/Dockerfile"
# A hard link when possible (the debug binary is large), else a copy.
ln "$bin" "$ctx/cattery" 2>/dev/null || cp "$bin" "$ctx/cattery"
"$DOCKER" build -q --build-arg "BASE=$base" -t "$tag" "$ctx" >&2
echo "$tag"
