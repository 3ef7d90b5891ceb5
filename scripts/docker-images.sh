#!/usr/bin/env bash
# Builds the container images the Docker-runtime tests use, locally (no public registry is
# reachable from the test machines), and caches what is expensive under ~/.cache:
#
#   cattery-test/rootfs:bookworm      Debian 12 minbase + python3, python3-venv, ca-certificates
#                                     (debootstrap, imported with `docker import`; the tarball is
#                                     cached in $CATTERY_IMAGE_CACHE, so later runs skip debootstrap)
#   cattery-test/agent:latest         rootfs + the cattery-test-agent binary, on port 8080
#   cattery-test/pipecat-venv:latest  rootfs + /app/.venv with pipecat, pipecatcloud, fastapi, uvicorn
#                                     (first on PATH), and uv in /usr/local/bin
#   cattery-test/pipecat-base:latest  pipecat-venv + Cattery's Python runner, following the contract
#                                     and layout of Pipecat Cloud's base image dailyco/pipecat-base
#                                     (port 8080, /bot, /ws, /readyz, session API routes, WORKDIR
#                                     /app, its venv /app/.venv, `uv` on PATH)
#   cattery-test/bot:latest           an examples/ bot built FROM cattery-test/pipecat-base the way
#                                     a Pipecat Cloud user's Dockerfile does
#
# usage: scripts/docker-images.sh [--agent-bin PATH] [--example NAME] [--force] [IMAGE...]
#   IMAGE is rootfs, agent, pipecat-base or bot (default: all four, in that order; an image
#   builds what it is based on first). --agent-bin defaults to cattery-test-agent in
#   ${CARGO_TARGET_DIR:-target}/debug, else (after only a release build) in .../release;
#   --example (default session-status) is a directory under examples/.
#
# Every image carries the label org.cattery.input-hash: a hash of everything it is built from
# (recipe, files, and the input hash of the image it is built on). An image whose label matches
# is not rebuilt, so a re-run with nothing changed only inspects the images. --force rebuilds
# them all (the rootfs tarball and the wheelhouse stay).
#
# No init is put in the images: the runtime starts every container with the engine's init
# (`docker run --init`, HostConfig.Init), which makes tini PID 1 for any image, including
# images Cattery did not build. See the notes at the bottom.
#
# Environment: CATTERY_IMAGE_CACHE (default ~/.cache/cattery: rootfs tarball, wheelhouse),
# PIP_CACHE_DIR (the host's pip cache, default ~/.cache/pip, shared with the build container),
# CATTERY_DEBIAN_MIRROR (default http://deb.debian.org/debian), DOCKER (default /usr/bin/docker).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

DOCKER="${DOCKER:-/usr/bin/docker}"
cache="${CATTERY_IMAGE_CACHE:-$HOME/.cache/cattery}"
pip_cache="${PIP_CACHE_DIR:-$HOME/.cache/pip}"
mirror="${CATTERY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
host_ca=/etc/ssl/certs/ca-certificates.crt
label=org.cattery.input-hash

ROOTFS_IMAGE=cattery-test/rootfs:bookworm
AGENT_IMAGE=cattery-test/agent:latest
VENV_IMAGE=cattery-test/pipecat-venv:latest
BASE_IMAGE=cattery-test/pipecat-base:latest
BOT_IMAGE=cattery-test/bot:latest

# What goes into the base image's venv: the same set the host's bot venv has
# (scripts/setup-python.sh), without the CLI.
PIP_PACKAGES=('pipecat-ai[webrtc,websocket]' 'pipecatcloud>=1.4,<2' fastapi uvicorn websockets)
# uv, as the real base image has it (it is built FROM astral-sh's uv image): outside the venv,
# since a `uv sync` in /app removes from /app/.venv whatever the project's lock does not name.
UV_PACKAGE='uv'

DEBOOTSTRAP_INCLUDE=python3,python3-venv,ca-certificates

agent_bin=""
example="session-status"
force=0
want=()
while [ $# -gt 0 ]; do
  case "$1" in
    --agent-bin) agent_bin="$2"; shift 2 ;;
    --example) example="$2"; shift 2 ;;
    --force) force=1; shift ;;
    rootfs|agent|pipecat-base|bot) want+=("$1"); shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#want[@]} -gt 0 ] || want=(rootfs agent pipecat-base bot)
if [ -z "$agent_bin" ]; then
  target="${CARGO_TARGET_DIR:-target}"
  agent_bin="$target/debug/cattery-test-agent"
  [ -x "$agent_bin" ] || [ ! -x "$target/release/cattery-test-agent" ] \
    || agent_bin="$target/release/cattery-test-agent"
fi

if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "docker-images: no Docker engine answers ($DOCKER info); start one with scripts/docker-ci.sh start" >&2
  exit 1
fi
mkdir -p "$cache" "$pip_cache"
# One build at a time per machine: concurrent runs would race on tags and the tarball.
exec 9>"$cache/images.lock"
flock 9

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "docker-images: $*" >&2; }
sha() { sha256sum | cut -c1-64; }
file_sha() { sha256sum "$1" | cut -c1-64; }
image_hash() { "$DOCKER" image inspect -f "{{index .Config.Labels \"$label\"}}" "$1" 2>/dev/null || true; }
up_to_date() { [ "$force" = 0 ] && [ "$(image_hash "$1")" = "$2" ]; }
# Ids an image tag pointed at before it was rebuilt: removed at the end, children first, so
# rebuilds do not pile up dangling images. An id still in use (a container) is kept.
replaced=()
remember_old() {
  local id
  id="$("$DOCKER" image inspect -f '{{.Id}}' "$1" 2>/dev/null)" && replaced=("$id" "${replaced[@]}") || true
}

tmp="$(mktemp -d "$cache/tmp.XXXXXX")"
build_ctr=""
cleanup() {
  [ -n "$build_ctr" ] && "$DOCKER" rm -f "$build_ctr" >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

# --- rootfs -----------------------------------------------------------------------------------
build_rootfs() {
  local recipe hash tarball t0 t1 dir
  recipe="debootstrap --variant=minbase --include=$DEBOOTSTRAP_INCLUDE bookworm $mirror; clean apt lists/caches; v1"
  hash="$(printf '%s' "$recipe" | sha)"
  if up_to_date "$ROOTFS_IMAGE" "$hash"; then log "rootfs: up to date"; return 0; fi
  remember_old "$ROOTFS_IMAGE"
  tarball="$cache/rootfs-bookworm-${hash:0:12}.tar"
  if [ ! -f "$tarball" ]; then
    if ! command -v debootstrap >/dev/null; then
      t0="$(now)"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
          debootstrap debian-archive-keyring; } >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; return 1; }
      log "rootfs: debootstrap installed in $(secs "$t0" "$(now)") s"
    fi
    t0="$(now)"
    dir="$tmp/rootfs"
    debootstrap --variant=minbase --include="$DEBOOTSTRAP_INCLUDE" bookworm "$dir" "$mirror" \
      >"$tmp/debootstrap.log" 2>&1 || { tail -30 "$tmp/debootstrap.log" >&2; return 1; }
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
      "$dir"/var/log/* "$dir"/dev/* 2>/dev/null || true
    t1="$(now)"
    log "rootfs: debootstrap took $(secs "$t0" "$t1") s"
    # One pass: the tar stream goes to the cache file and to the engine at the same time.
    tar --numeric-owner -C "$dir" -c . | tee "$tarball.tmp" | import_rootfs - "$hash"
    mv "$tarball.tmp" "$tarball"
    rm -rf "$dir"
    log "rootfs: cached $tarball ($(du -m "$tarball" | cut -f1) MiB) and imported $ROOTFS_IMAGE in $(secs "$t1" "$(now)") s"
    return 0
  fi
  t0="$(now)"
  import_rootfs "$tarball" "$hash"
  log "rootfs: imported $ROOTFS_IMAGE from $tarball in $(secs "$t0" "$(now)") s"
}

import_rootfs() {
  "$DOCKER" import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c "LABEL $label=$2" \
    "$1" "$ROOTFS_IMAGE" >/dev/null
}

# --- agent ------------------------------------------------------------------------------------
build_agent() {
  local ctx hash t0 missing
  [ -x "$agent_bin" ] || { log "agent: $agent_bin is missing (cargo build -p cattery-test-agent, or --release; or give --agent-bin PATH)"; return 1; }
  ctx="$tmp/agent"
  mkdir -p "$ctx"
  cp "$agent_bin" "$ctx/cattery-test-agent"
  # CATTERY_HOST=0.0.0.0: a published port reaches the container's own address, not its loopback.
  # The agent's switches come from the command (CMD) or from $CATTERY_TEST_AGENT_ARGS (an
  # agent's env, for deployments that can only set environment variables).
  cat >"$ctx/Dockerfile" <<'EOF'
FROM cattery-test/rootfs:bookworm
COPY cattery-test-agent /usr/local/bin/cattery-test-agent
ENV PORT=8080 CATTERY_HOST=0.0.0.0
EXPOSE 8080
ENTRYPOINT ["/bin/sh", "-c", "exec /usr/local/bin/cattery-test-agent $CATTERY_TEST_AGENT_ARGS \"$@\"", "cattery-test-agent"]
EOF
  hash="$( { cat "$ctx/Dockerfile"; file_sha "$ctx/cattery-test-agent"; image_hash "$ROOTFS_IMAGE"; } | sha)"
  if up_to_date "$AGENT_IMAGE" "$hash"; then log "agent: up to date"; return 0; fi
  remember_old "$AGENT_IMAGE"
  t0="$(now)"
  "$DOCKER" build -q --label "$label=$hash" -t "$AGENT_IMAGE" "$ctx" >/dev/null
  # The binary is dynamically linked: check that the rootfs has every library it needs.
  missing="$("$DOCKER" run --rm --entrypoint /usr/bin/ldd "$AGENT_IMAGE" /usr/local/bin/cattery-test-agent | grep 'not found' || true)"
  if [ -n "$missing" ]; then
    log "agent: libraries missing in the image: $missing"
    "$DOCKER" rmi "$AGENT_IMAGE" >/dev/null
    return 1
  fi
  log "agent: built $AGENT_IMAGE in $(secs "$t0" "$(now)") s"
}

# --- pipecat-base -----------------------------------------------------------------------------
# Two images, so that a change to the runner (frequent) rebuilds only a thin layer:
#   cattery-test/pipecat-venv:latest  rootfs + /app/.venv with pipecat (slow: ~1 GB of wheels), uv
#   cattery-test/pipecat-base:latest  + the runner, env and entry command (`docker build`, seconds)
#
# The venv is built with `docker run` + `docker commit` rather than `docker build`, so that a
# wheelhouse on the host, $CATTERY_IMAGE_CACHE/wheels, can be bind-mounted into the install step
# (bind mounts are not committed). pip's own HTTP cache does not help on machines whose proxy
# strips the Cache-Control headers of PyPI's files, so the wheels are kept explicitly: install
# offline from the wheelhouse, and only when that fails (first run, or a new version wanted)
# download the missing wheels into it with `pip wheel` and install offline again (`wheel` goes
# into the venv first: Debian's venv has none, and without it pip cannot build the wheel of a
# package published only as a `setup.py` source archive, such as docopt). The machine's
# CA bundle is copied in and PIP_CERT points at it: on machines whose egress goes through a
# TLS-inspecting proxy, the proxy's CA is only in that bundle, and pip (which uses certifi by
# default) fails without it. The same holds for `pip install` in a bot's Dockerfile later, and
# for `uv` (SSL_CERT_FILE: that bundle, not uv's own roots).
#
# The layout is the real base image's: its venv is /app/.venv (first on PATH), made there by
# `uv sync`, and a user's Dockerfile may run `uv sync --locked` in /app again (Pipecat's
# quickstart does). That sync is exact: it removes from /app/.venv every package the user's
# lock does not name, the base's own included. The real image's app.py then needs fastapi,
# pipecatcloud and loguru from the user's lock, and this image's runner needs fastapi and
# uvicorn (pipecat-ai[runner] brings both; docs/builds.md). UV_PYTHON_DOWNLOADS=never: uv uses
# the venv's Python (Debian's 3.11) and never fetches one.
build_pipecat_venv() {
  local hash t0 t1 pkgs
  hash="$( { printf '%s\n' "${PIP_PACKAGES[@]}" "$UV_PACKAGE" "v4 /app/.venv"; file_sha "$host_ca"; image_hash "$ROOTFS_IMAGE"; } | sha)"
  if up_to_date "$VENV_IMAGE" "$hash"; then log "pipecat-venv: up to date"; return 0; fi
  remember_old "$VENV_IMAGE"
  t0="$(now)"
  build_ctr="cattery-build-venv-$$"
  pkgs="$(printf "'%s' " "${PIP_PACKAGES[@]}")"
  mkdir -p "$cache/wheels"
  local pip=/app/.venv/bin/pip offline="--no-index --find-links /wheels"
  "$DOCKER" create --name "$build_ctr" --network host \
    -v "$pip_cache:/root/.cache/pip" -v "$cache/wheels:/wheels" \
    -e PIP_CERT="$host_ca" -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_DEFAULT_TIMEOUT=180 \
    "$ROOTFS_IMAGE" sh -ec "python3 -m venv /app/.venv
      if ! $pip install -q $offline $pkgs 2>/dev/null; then
        echo 'wheelhouse incomplete: downloading'
        $pip install -q wheel
        $pip wheel -q -w /wheels --find-links /wheels $pkgs
        $pip install -q $offline $pkgs
      fi
      if ! $pip install -q $offline --target /tmp/uv $UV_PACKAGE 2>/dev/null; then
        echo 'wheelhouse incomplete: downloading'
        $pip download -q --no-deps -d /wheels $UV_PACKAGE
        $pip install -q $offline --target /tmp/uv $UV_PACKAGE
      fi
      install -m 0755 /tmp/uv/bin/uv /usr/local/bin/uv
      rm -rf /tmp/uv
      uv --version" >/dev/null
  "$DOCKER" cp "$host_ca" "$build_ctr:$host_ca"
  "$DOCKER" start -a "$build_ctr" >"$tmp/pip.log" 2>&1 || { tail -30 "$tmp/pip.log" >&2; return 1; }
  t1="$(now)"
  if grep -q 'wheelhouse incomplete' "$tmp/pip.log"; then
    log "pipecat-venv: pip install took $(secs "$t0" "$t1") s (downloaded wheels into $cache/wheels)"
  else
    log "pipecat-venv: pip install took $(secs "$t0" "$t1") s (offline, from $cache/wheels)"
  fi
  "$DOCKER" commit \
    -c 'ENV PATH=/app/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c "ENV PIP_CERT=$host_ca SSL_CERT_FILE=$host_ca PIP_DISABLE_PIP_VERSION_CHECK=1 UV_PYTHON_DOWNLOADS=never" \
    -c 'WORKDIR /app' \
    -c "LABEL $label=$hash" \
    "$build_ctr" "$VENV_IMAGE" >/dev/null
  "$DOCKER" rm "$build_ctr" >/dev/null
  build_ctr=""
  log "pipecat-venv: committed $VENV_IMAGE in $(secs "$t1" "$(now)") s"
}

build_pipecat_base() {
  local ctx hash t0
  ctx="$tmp/base"
  mkdir -p "$ctx"
  cp "$repo/crates/cattery/runner/cattery_runner.py" "$ctx/"
  # The real base image's layout and entry command: WORKDIR /app (the user's Dockerfile copies
  # bot.py there), an optional /app/pre-app.sh, then exec the server, here Cattery's runner in
  # place of app.py, listening on 0.0.0.0:$PORT as the base image does.
  cat >"$ctx/Dockerfile" <<'EOF'
FROM cattery-test/pipecat-venv:latest
COPY cattery_runner.py /opt/cattery/cattery_runner.py
ENV PYTHONUNBUFFERED=1 PORT=8080 CATTERY_HOST=0.0.0.0 CATTERY_BOT_DIR=/app
WORKDIR /app
EXPOSE 8080
CMD ["sh", "-c", "[ -f /app/pre-app.sh ] && sh /app/pre-app.sh; exec python /opt/cattery/cattery_runner.py"]
EOF
  hash="$( { cd "$ctx" && sha256sum Dockerfile cattery_runner.py; image_hash "$VENV_IMAGE"; } | sha)"
  if up_to_date "$BASE_IMAGE" "$hash"; then log "pipecat-base: up to date"; return 0; fi
  remember_old "$BASE_IMAGE"
  t0="$(now)"
  "$DOCKER" build -q --label "$label=$hash" -t "$BASE_IMAGE" "$ctx" >"$tmp/base-build.log" 2>&1 \
    || { tail -30 "$tmp/base-build.log" >&2; return 1; }
  log "pipecat-base: built $BASE_IMAGE in $(secs "$t0" "$(now)") s"
}

# --- bot --------------------------------------------------------------------------------------
build_bot() {
  local src ctx hash t0
  src="$repo/examples/$example"
  [ -f "$src/bot.py" ] || { log "bot: $src/bot.py is missing"; return 1; }
  ctx="$tmp/bot"
  mkdir -p "$ctx"
  cp "$src/bot.py" "$ctx/"
  [ -f "$src/requirements.txt" ] && cp "$src/requirements.txt" "$ctx/" || : >"$ctx/requirements.txt"
  # A Pipecat Cloud user's Dockerfile, with the base image mapped to the local one. Without
  # --upgrade, pip contacts no index when the base already satisfies every requirement.
  cat >"$ctx/Dockerfile" <<'EOF'
FROM cattery-test/pipecat-base:latest
COPY ./requirements.txt requirements.txt
RUN pip install --no-cache-dir -r requirements.txt
COPY ./bot.py bot.py
EOF
  hash="$( { cd "$ctx" && sha256sum Dockerfile bot.py requirements.txt; image_hash "$BASE_IMAGE"; } | sha)"
  if up_to_date "$BOT_IMAGE" "$hash"; then log "bot: up to date ($example)"; return 0; fi
  remember_old "$BOT_IMAGE"
  t0="$(now)"
  "$DOCKER" build -q --network host --label "$label=$hash" --label "org.cattery.example=$example" \
    -t "$BOT_IMAGE" "$ctx" >"$tmp/bot-build.log" 2>&1 || { tail -30 "$tmp/bot-build.log" >&2; return 1; }
  log "bot: built $BOT_IMAGE from examples/$example in $(secs "$t0" "$(now)") s"
}

t_all="$(now)"
need() { local w; for w in "${want[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
# Dependencies first: agent and pipecat-base need the rootfs, bot needs pipecat-base.
if need rootfs || need agent || need pipecat-base || need bot; then build_rootfs; fi
if need agent; then build_agent; fi
if need pipecat-base || need bot; then build_pipecat_venv; build_pipecat_base; fi
if need bot; then build_bot; fi
for id in "${replaced[@]}"; do
  "$DOCKER" rmi "$id" >/dev/null 2>&1 || true
done
log "done in $(secs "$t_all" "$(now)") s"

# Notes
# - Why the engine's init and not tini in the image: in a PID namespace, PID 1 gets no default
#   signal actions, so a SIGTERM sent to a Python PID 1 before it has installed a handler (while
#   it imports bot.py and pipecat) is dropped, and `docker stop` waits the whole grace before
#   SIGKILL. With an init as PID 1 the signal is forwarded to Python, whose default action ends
#   it at once. The runtime must guarantee this for images it did not build, so it sets
#   HostConfig.Init on every container; putting tini in our test images as well would only nest
#   two inits. Debian's docker.io ships its init as /usr/bin/docker-init (tini-static).
