#!/usr/bin/env bash
# The report's browser test opens the page in a real headless Chromium (Debian's package; the
# Playwright Python package drives it, it never downloads a browser of its own). Installs
# Chromium when it is missing and this machine can (root with apt-get); otherwise says so and the
# test is skipped outside CI.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the report's browser test"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } \
    || echo "could not install chromium; the report's browser test will be skipped (CI: it fails)"
else
  echo "chromium not found (install Debian's 'chromium' package); the report's browser test will be skipped"
fi
exit 0
