"""CPU time by pipeline stage (edgecv.cpu): read from the kernel's per-thread accounting."""
from __future__ import annotations

import threading
import time

import pytest

from edgecv.cpu import ROLES, CpuMeter, thread_cpu_s
from edgecv.track import load_offline_models, offline_config, run_offline


def _spin(seconds: float, done: threading.Event, release: threading.Event) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
    done.set()
    release.wait(10)  # alive until sampled: /proc lists only living threads


def test_a_busy_thread_is_counted_under_its_role():
    meter = CpuMeter()
    release = threading.Event()
    threads, done = [], []
    for name, seconds in (("worker-spin", 0.3), ("helper", 0.1)):
        done.append(threading.Event())
        threads.append(threading.Thread(target=_spin, args=(seconds, done[-1], release), name=name))
        threads[-1].start()
    for d in done:
        assert d.wait(30)
    meter.sample()
    release.set()
    for t in threads:
        t.join()
    seconds = meter.seconds()
    assert set(seconds) == set(ROLES)
    assert 0.25 <= seconds["workers"] <= 0.5, seconds
    assert 0.07 <= seconds["other"] <= 0.3, seconds
    assert seconds["capture"] == 0.0 and seconds["inference"] == 0.0
    per = meter.per_frame_ms(10)
    assert per["workers"] == pytest.approx(seconds["workers"] * 100, abs=0.01)
    assert per["total"] == pytest.approx(sum(v for k, v in per.items() if k != "total"), abs=0.01)


def test_a_thread_that_ends_before_any_sample_is_counted_when_it_says_so():
    """A short run's inference threads end before the meter's next sample: the time they report as they end
    counts, and a thread that does not report is lost (which is why the pipeline's threads do)."""
    meter = CpuMeter()

    def spin(seconds: float, report: bool) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass
        if report:
            meter.thread_ended()

    for name, report in (("inference", True), ("capture-silent", False)):
        t = threading.Thread(target=spin, args=(0.2, report), name=name)
        t.start()
        t.join()
    meter.sample()
    seconds = meter.seconds()
    assert 0.18 <= seconds["inference"] <= 0.4, seconds
    assert seconds["capture"] == 0.0, seconds


def test_thread_cpu_lists_this_thread():
    assert threading.get_native_id() in thread_cpu_s()


@pytest.mark.integration
def test_offline_run_reports_cpu_per_frame_by_stage(vtest, assets):
    cfg = offline_config(str(vtest), str(assets / "models" / "yolox_nano.onnx"), classes=["person"], threads=1)
    run = run_offline(cfg, load_offline_models(cfg), "video", max_frames=40)
    per = run.pipeline.cpu.per_frame_ms(run.frames)
    # each stage ran on its own threads, and the model's inference is the largest part on one thread
    assert per["inference"] > 0 and per["capture"] > 0 and per["workers"] > 0, per
    assert per["inference"] > per["workers"] and per["inference"] > per["capture"], per
    stats = run.pipeline.stats()
    assert set(stats["cpu_ms_per_frame"]) == set(ROLES) | {"total"}
