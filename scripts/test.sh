#!/usr/bin/env bash
# Runs the test suite: installs what the tests need (system packages, .venv), then pytest.
# Assets (models, videos) come from $EDGECV_ASSETS, default ../shared next to the repository.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" "cpu,dev,eval,tools"
# the peer trackers `edgecv bench trackers` compares with, in their own environment (tests/test_eval.py)
bash "$REPO/scripts/peers.sh" >/dev/null
if [ -z "${EDGECV_ASSETS:-}" ] && [ -d "$REPO/../shared/models" ]; then
  EDGECV_ASSETS="$(cd "$REPO/../shared" && pwd)"
fi
export EDGECV_ASSETS="${EDGECV_ASSETS:-}"
cd "$REPO"
# pytest exits 5 when it collects no test: that fails this script too.
exec "$REPO/.venv/bin/python" -m pytest -q -ra -p no:cacheprovider "$@"
