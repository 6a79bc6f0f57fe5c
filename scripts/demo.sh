#!/usr/bin/env bash
# Installs edgecv and runs the demo: the daemon on the street clip (media/vtest.avi) with YOLOX-Nano.
# Events are printed on the console by the daemon and, as received over MQTT from a private Mosquitto
# broker started here, by mosquitto_sub (lines starting with "mqtt>").
# Extra arguments go to `edgecv run` (e.g. --fast to read the clip as fast as possible).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup.sh" cpu
PY="$REPO/.venv/bin/python"
if [ -z "${EDGECV_ASSETS:-}" ] && [ -d "$REPO/../shared/models" ]; then
  export EDGECV_ASSETS="$(cd "$REPO/../shared" && pwd)"
fi
# locate the model and the clip (downloads them into ~/.cache/edgecv/assets when missing)
"$REPO/.venv/bin/edgecv" assets --fetch >/dev/null || "$REPO/.venv/bin/edgecv" assets --fetch | grep -E "yolox|vtest" || true

WORK="$(mktemp -d)"
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$PORT" > "$WORK/mosquitto.conf"
MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
"$MOSQ" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
BROKER=$!
cleanup() {
  kill ${SUB:-} "$BROKER" 2>/dev/null || true
  wait ${SUB:-} "$BROKER" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 50); do "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $PORT), 0.2)" 2>/dev/null && break; sleep 0.1; done
echo "demo: Mosquitto on 127.0.0.1:$PORT; subscribing to edgecv/demo/status and edgecv/demo/+/events" >&2
mosquitto_sub -h 127.0.0.1 -p "$PORT" -v -t 'edgecv/demo/status' -t 'edgecv/demo/+/events' \
  > >(sed -u 's/^/mqtt> /') &
SUB=$!  # mosquitto_sub itself: killing it ends the sed too
sleep 0.3
MQTT_PORT="$PORT" EDGECV_STATE_DIR="$WORK/state" "$REPO/.venv/bin/edgecv" run "$REPO/configs/demo.yaml" "$@"
sleep 0.5
