"""`edgecv bench soak`: the demo (its file looping, paced at 20 fps so that the 795-frame clip starts again
within the run) against a real broker for a minute, sampled every few seconds; no growth of memory, threads or
file descriptors beyond the documented bounds after warm-up. The 10-minute soak at 12 cameras is a benchmark
(README, Capacity), not a test."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import yaml
from broker import Subscriber
from conftest import REPO, edgecv_env

from edgecv.soak import DEFAULT_MAX_FDS, DEFAULT_MAX_RSS_MB, DEFAULT_MAX_THREADS, Bounds, SoakSample, verdict

DURATION_S, INTERVAL_S, WARMUP_S = 60, 4, 12


def _s(t: float, rss: float, threads: int, fds: int, processed: int) -> SoakSample:
    return SoakSample(t, rss, threads, fds, 0, processed, 0, "cam=streaming", "connected")


@pytest.mark.parametrize("samples, stopped, ok, says", [
    # growth during the warm-up (t < 30) does not count; after it, within the bounds
    ([_s(5, 100, 9, 8, 10), _s(30, 150, 12, 12, 50), _s(90, 190, 14, 20, 900)], None, True, "PASS: RSS 150.0 -> 190.0"),
    ([_s(30, 150, 12, 12, 50), _s(90, 201, 12, 12, 900)], None, False, "rss_mb +51 > +50"),
    ([_s(30, 150, 12, 12, 50), _s(90, 150, 15, 12, 900)], None, False, "threads +3 > +2"),
    ([_s(30, 150, 12, 12, 50), _s(90, 150, 12, 23, 900)], None, False, "fds +11 > +10"),
    ([_s(30, 150, 12, 12, 50), _s(90, 150, 12, 12, 50)], None, False, "no frame processed after the warm-up"),
    ([_s(30, 150, 12, 12, 50), _s(60, 150, 12, 12, 90)], "the daemon stopped after 61 s", False, "stopped after 61 s"),
    ([_s(5, 100, 9, 8, 10), _s(30, 150, 12, 12, 50)], None, False, "fewer than 2 samples after the 30 s warm-up"),
])
def test_soak_verdict_compares_first_sample_after_warmup_with_last(samples, stopped, ok, says):
    v = verdict(samples, 30, Bounds(), stopped)
    assert v.ok is ok and says in v.text and v.text.startswith("soak verdict: " + ("PASS" if ok else "FAIL")), v.text


@pytest.mark.integration
@pytest.mark.timeout(DURATION_S + 240)
def test_a_minute_soak_of_the_demo_shows_no_growth(assets, broker, tmp_path):
    out = tmp_path / "soak.csv"
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    demo["cameras"]["street"].update(realtime=False, pace_fps=20.0)  # the clip (795 frames) loops after 40 s
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(demo))
    sub = Subscriber(broker.port, ["edgecv/demo/+/events"])
    env = edgecv_env(assets, tmp_path, MQTT_HOST="127.0.0.1", MQTT_PORT=str(broker.port))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "edgecv.cli", "bench", "soak", str(config),
             "--duration", str(DURATION_S), "--interval", str(INTERVAL_S), "--warmup", str(WARMUP_S),
             "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=DURATION_S + 180)
        received = len(sub.snapshot())
    finally:
        sub.close()
    print(proc.stdout)
    assert "Traceback" not in proc.stderr, proc.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    samples = [{k: (v if k in ("cameras", "mqtt") else float(v)) for k, v in r.items()} for r in rows]
    # a sample every INTERVAL_S for the whole run (a loaded machine may lose one or two)
    assert len(samples) >= DURATION_S / INTERVAL_S - 3, proc.stdout
    assert samples[-1]["t_s"] >= DURATION_S - 1
    after = [s for s in samples if s["t_s"] >= WARMUP_S]
    first, last = after[0], after[-1]
    assert last["rss_mb"] - first["rss_mb"] <= DEFAULT_MAX_RSS_MB, samples
    assert last["threads"] - first["threads"] <= DEFAULT_MAX_THREADS, samples
    assert last["fds"] - first["fds"] <= DEFAULT_MAX_FDS, samples
    # the daemon was working all along, not idle: the clip looped (40 s long), frames kept being processed,
    # the broker took the events (the spool stays near empty)
    assert all(s["cameras"] == "street=streaming" for s in after), [s["cameras"] for s in after]
    processed = [s["frames_processed"] for s in after]
    assert all(b > a for a, b in zip(processed, processed[1:])), processed
    assert all(s["mqtt"] == "connected" for s in after)
    assert max(s["spool_depth"] for s in after) <= 50
    assert received > 0 and received >= last["events"] - 50, (received, last["events"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("soak verdict: PASS: "), proc.stdout
