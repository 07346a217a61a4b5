#!/usr/bin/env bash
# Install what the tests need, then run them all. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
# Debian's Chromium drives the browser test (never `playwright install`: it downloads a browser).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"
  else
    echo "chromium not installed and not root: browser tests will skip (sudo apt-get install chromium)"
  fi
fi
exec python -m pytest "$@"
