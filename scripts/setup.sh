#!/usr/bin/env bash
# Installs what edgecv needs on a Debian/Ubuntu machine: system packages (when missing) and a
# virtual environment in .venv with edgecv and the given extras. Sourced by demo.sh and test.sh.
# Usage: scripts/setup.sh [EXTRAS]   (default EXTRAS: cpu; with "dev" also the tests' RTSP server packages)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-cpu}"

apt_install() {
  local missing=()
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
  command -v mosquitto_sub >/dev/null 2>&1 || missing+=(mosquitto-clients)
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
  if [[ ",$EXTRAS," == *",dev,"* ]]; then
    # tests/test_rtsp.py: a real RTSP server (GStreamer's, run by the system python3 through PyGObject)
    # serving vtest.avi (MS-MPEG4, decoded by gstreamer1.0-libav) as RTP/JPEG
    local pkg
    for pkg in python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
               gstreamer1.0-libav; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    # tests/test_http.py: the live preview page opened in a real headless browser
    command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
  fi
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
