#!/usr/bin/env bash
# Installs playwright-core (npm) for the dashboard's browser test (crates/cattery/tests/e2e/
# dashboard.rs), idempotently, under $CATTERY_PLAYWRIGHT_DIR (default ~/.cache/cattery/playwright).
# Pinned to 1.57, which still runs on Debian 12's node 18 (1.65 needs node 20). Only the driver
# library: the browser is Debian's chromium (/usr/bin/chromium), never a downloaded one. Needs
# node and npm (.ci/run installs them with apt).
set -euo pipefail
version=1.57.0
dir="${CATTERY_PLAYWRIGHT_DIR:-$HOME/.cache/cattery/playwright}"
mkdir -p "$dir"
have=$(node -e "try { console.log(require('$dir/node_modules/playwright-core/package.json').version) } catch (_) {}" 2>/dev/null || true)
if [ "$have" != "$version" ]; then
  cd "$dir"
  [ -f package.json ] || echo '{"name":"cattery-dashboard-e2e","private":true}' > package.json
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --loglevel=error "playwright-core@$version"
fi
echo "playwright-core $version in $dir"
