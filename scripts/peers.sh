#!/usr/bin/env bash
# Installs the peer trackers that `edgecv bench trackers` compares edgecv with (roboflow `trackers`, pinned)
# into their own environment, .venv-peers: they are never dependencies of edgecv itself.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$REPO/.venv-peers/bin/python" ]; then
  python3 -m venv "$REPO/.venv-peers"
fi
"$REPO/.venv-peers/bin/python" -m pip install -q --disable-pip-version-check "trackers==2.6.1"
echo "peer trackers installed: $REPO/.venv-peers/bin/python (edgecv bench trackers --suite DIR)"
