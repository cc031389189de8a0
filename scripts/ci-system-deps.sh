#!/usr/bin/env bash
# System packages the tests need beyond pip, installed by .ci/run: Debian's chromium, which the web
# chat page test (tests/test_serve_page.py) and the agent loop tests (tests/test_agent_loop.py) drive
# through Playwright (never `playwright install`: Playwright launches this binary via executable_path).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq chromium >/dev/null
