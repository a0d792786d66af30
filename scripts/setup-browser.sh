#!/usr/bin/env bash
# Install what tests/test_ui.py drives: Debian's chromium + chromium-driver (as root, with apt)
# and the Python selenium bindings in .venv.
# Idempotent: apt runs only when /usr/bin/chromium or /usr/bin/chromedriver is missing, pip only
# when .venv lacks the pinned selenium. Without root or apt it warns and goes on: the UI test
# then skips, saying /usr/bin/chromium is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
SELENIUM_PIN="selenium==4.51.0"

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing chromium and chromium-driver with apt-get..."
    export DEBIAN_FRONTEND=noninteractive
    # A fresh image has no package lists: update only when the first try cannot find the packages.
    if ! apt-get install -y -q chromium chromium-driver >/dev/null; then
      apt-get update -q >/dev/null
      apt-get install -y -q chromium chromium-driver >/dev/null || true
    fi
  fi
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "WARNING: /usr/bin/chromium or /usr/bin/chromedriver is missing and could not be installed" \
         "(needs root and Debian's apt): tests/test_ui.py will skip." >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup-browser.sh: no virtualenv at $VENV (run scripts/setup.sh first)" >&2
  exit 1
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('selenium') != '${SELENIUM_PIN#selenium==}')" 2>/dev/null; then
  echo "Installing $SELENIUM_PIN into $VENV..."
  "$VENV/bin/python" -m pip install -q "$SELENIUM_PIN"
fi
