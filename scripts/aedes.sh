#!/usr/bin/env bash
# aedes, an MQTT 3.1.1-only broker (npm), for the test of the MQTT 5 -> 3.1.1 fallback (tests/test_mqtt_fallback.py);
# installed into .node-aedes/ next to the repository's code, never into edgecv's dependencies.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v npm >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nodejs npm
fi
if [ ! -d "$REPO/.node-aedes/node_modules/aedes" ]; then
  npm install --silent --no-audit --no-fund --prefix "$REPO/.node-aedes" aedes@0.51.3
fi
