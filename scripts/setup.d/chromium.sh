#!/usr/bin/env bash
# Headless Chromium and its matching WebDriver from Debian (never a downloaded browser), and the
# Selenium client that drives them in tests/test_browser.py. Runs as root in CI.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi
.venv/bin/pip install --quiet "selenium>=4.20"
chromium --version
chromedriver --version
