#!/usr/bin/env bash
# Installs what edgecv needs on a Debian/Ubuntu machine: system packages (when missing) and a
# virtual environment in .venv with edgecv and the given extras. Sourced by demo.sh and test.sh.
# Usage: scripts/setup.sh [EXTRAS]   (default EXTRAS: cpu)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-cpu}"

apt_install() {
  local missing=()
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "edgecv setup: installing system packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install
if [ ! -x "$REPO/.venv/bin/python" ]; then
  python3 -m venv "$REPO/.venv"
fi
"$REPO/.venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
"$REPO/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[$EXTRAS]"
