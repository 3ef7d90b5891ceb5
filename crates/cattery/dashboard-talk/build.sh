#!/usr/bin/env bash
# Builds the dashboard's "Talk to a bot" bundle (docs/dashboard.md) from Pipecat's client
# packages on npm: crates/cattery/src/dashboard/assets/talk.js, which the binary embeds.
#
#   build.sh            rebuild the bundle in place
#   build.sh --check    rebuild into a temp file and fail if it differs from the committed one
#
# The exact versions are pinned by package-lock.json beside this file; `npm ci` installs them
# under $CATTERY_TALK_NPM_DIR (default ~/.cache/cattery/dashboard-talk), not in the tree.
# esbuild (its own platform binary comes inside its npm package) bundles talk.js with the
# packages into one minified IIFE; @daily-co/daily-js, which the transport imports for a media
# manager Cattery does not use (it loads code from Daily's servers), is replaced by a stub.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../src/dashboard/assets/talk.js"
dir="${CATTERY_TALK_NPM_DIR:-$HOME/.cache/cattery/dashboard-talk}"
mkdir -p "$dir"
if ! cmp -s "$here/package-lock.json" "$dir/package-lock.json" || [ ! -x "$dir/node_modules/.bin/esbuild" ]; then
  cp "$here/package.json" "$here/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
fi
target="$out"
if [ "${1:-}" = "--check" ]; then
  target="$(mktemp)"
  trap 'rm -f "$target"' EXIT
fi
NODE_PATH="$dir/node_modules" "$dir/node_modules/.bin/esbuild" "$here/talk.js" \
  --bundle --minify --format=iife --target=chrome110,firefox110,safari16 \
  --alias:@daily-co/daily-js="$here/daily-stub.js" \
  --legal-comments=eof --log-level=warning \
  --banner:js="// Built by crates/cattery/dashboard-talk/build.sh from @pipecat-ai/client-js and @pipecat-ai/small-webrtc-transport (BSD-2-Clause); do not edit." \
  --outfile="$target"
if [ "${1:-}" = "--check" ]; then
  if ! cmp -s "$target" "$out"; then
    echo "crates/cattery/src/dashboard/assets/talk.js is not what build.sh builds: run crates/cattery/dashboard-talk/build.sh and commit it" >&2
    exit 1
  fi
  echo "talk.js matches its sources"
else
  echo "built $out ($(wc -c < "$out") bytes)"
fi
