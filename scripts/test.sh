#!/usr/bin/env bash
# Runs the test suite: installs what the tests need (system packages, .venv), then pytest.
# Assets (models, videos) come from $EDGECV_ASSETS, default ../shared next to the repository.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" "cpu,dev,eval,tools"
# the peer trackers `edgecv bench trackers` compares with, in their own environment (tests/test_eval.py)
bash "$REPO/scripts/peers.sh" >/dev/null
# aedes, an MQTT 3.1.1-only broker (npm), for the MQTT 5 -> 3.1.1 fallback test (tests/test_mqtt_fallback.py)
bash "$REPO/scripts/aedes.sh" >/dev/null
if [ -z "${EDGECV_ASSETS:-}" ] && [ -d "$REPO/../shared/models" ]; then
  EDGECV_ASSETS="$(cd "$REPO/../shared" && pwd)"
fi
export EDGECV_ASSETS="${EDGECV_ASSETS:-}"
cd "$REPO"
# pytest exits 5 when it collects no test: that fails this script too. Two workers (pytest-xdist), each test
# file on one of them (its module-scoped daemon runs and brokers are made once): most tests wait on real time
# (cameras at their own rate, broker outages), so the suite takes 8 minutes on 2 cores instead of 12.
exec "$REPO/.venv/bin/python" -m pytest -q -ra -p no:cacheprovider -n 2 --dist loadfile "$@"
