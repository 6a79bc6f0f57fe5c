"""``/metrics``: the pipeline's counters as Prometheus metrics, read at scrape time by a custom collector.

The pipeline keeps counting as it does for its stats message; a scrape reads those counters (plain ints, no
lock), so the hot path pays nothing for the metrics. The two histograms need every value since the start:
:func:`attach_histograms` gives the inference and latency windows a :class:`~edgecv.types.BucketCounts` (a bisect
and two additions per value), only when the HTTP server is on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .. import __version__
from ..types import BucketCounts

# bucket bounds in ms (the pipeline's windows hold ms); exported in seconds
INFERENCE_BOUNDS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
LATENCY_BOUNDS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def attach_histograms(pipeline: Any) -> None:
    """Count every inference time (per model, per frame) and capture → processed latency (per camera) in
    buckets from now on."""
    for window in pipeline.inference.model_ms.values():
        window.buckets = BucketCounts(INFERENCE_BOUNDS_MS)
    for w in pipeline.workers.values():
        w.latency.buckets = BucketCounts(LATENCY_BOUNDS_MS)


def _histogram(family: HistogramMetricFamily, labels: list[str], buckets: Optional[BucketCounts]) -> None:
    if buckets is None:
        return
    cumulative, total_ms = buckets.cumulative()
    family.add_metric(labels, [("+Inf" if b == float("inf") else f"{b / 1000:g}", n) for b, n in cumulative],
                      total_ms / 1000)


def build_info(pipeline: Any) -> dict[str, str]:
    """The labels of ``edgecv_build_info``: version, the detector's backend and the models' file names."""
    models = pipeline.models
    return {"version": __version__, "backend": str(models.detector.backend.name),
            "model": ",".join(Path(str(m.backend.path)).name for m in models.all)}


class PipelineCollector:
    """A prometheus_client collector over a running pipeline and its MQTT publisher (None: MQTT is off)."""

    def __init__(self, pipeline: Any, publisher: Any = None, preview: Any = None) -> None:
        self.pipeline = pipeline
        self.publisher = publisher
        self.preview = preview
        self.info = build_info(pipeline)

    def collect(self) -> Iterator[Metric]:
        yield from self._cameras()
        yield from self._histograms()
        yield from self._publisher()
        if self.preview is not None:
            yield CounterMetricFamily("edgecv_preview_frames_encoded", "Preview frames drawn and JPEG-encoded (only "
                                      "while someone watches, once per frame however many do)",
                                      value=self.preview.encoded)
        info = GaugeMetricFamily("edgecv_build_info", "edgecv's version, inference backend and models (value 1)",
                                 labels=list(self.info))
        info.add_metric(list(self.info.values()), 1)
        yield info

    def _cameras(self) -> Iterator[Metric]:
        p = self.pipeline
        counters = {key: CounterMetricFamily(f"edgecv_{key}", doc, labels=["camera"]) for key, doc in (
            ("frames_read", "Frames read from the camera's source"),
            ("frames_processed", "Frames tracked and run through the rules"),
            ("frames_dropped", "Frames replaced in the one-slot buffer before inference took them"),
            ("frames_inferred", "Frames the models ran on (the others were skipped by the camera's detect section)"),
            ("frames_failed", "Frames dropped because their inference or processing failed"),
            ("source_reconnects", "Times the source was reopened after its stream was lost"))}
        up = GaugeMetricFamily("edgecv_source_up", "1 while the camera's source is streaming, else 0",
                               labels=["camera"])
        events = CounterMetricFamily("edgecv_events", "Events emitted", labels=["camera", "type"])
        skipped = CounterMetricFamily("edgecv_frames_skipped", "Frames the detector did not run on, by reason "
                                      "(interval: every_n; static: the motion gate; disabled: detection switched "
                                      "off; deferred: the detector was busy)", labels=["camera", "reason"])
        for name, w in p.workers.items():
            for reason, n in w.frames_skipped_by.items():
                skipped.add_metric([name, reason], n)
            s = p.sources[name]
            values = {"frames_read": s.stats.read, "frames_processed": w.processed, "frames_dropped": s.slot.dropped,
                      "frames_inferred": w.frames_inferred, "frames_failed": w.frames_failed,
                      "source_reconnects": s.stats.reconnects}
            for key, value in values.items():
                counters[key].add_metric([name], value)
            up.add_metric([name], 1 if s.state == "streaming" else 0)
            for kind, n in sorted(dict(w.events_by_type).items()):
                events.add_metric([name, kind], n)
        yield from counters.values()
        yield skipped
        yield up
        yield events

    def _histograms(self) -> Iterator[Metric]:
        p = self.pipeline
        infer = HistogramMetricFamily("edgecv_inference_seconds", "Inference time per frame (a batch's time shared "
                                      "by its frames), per model", labels=["model"])
        for name, window in p.inference.model_ms.items():
            _histogram(infer, [name], window.buckets)
        latency = HistogramMetricFamily("edgecv_pipeline_latency_seconds", "From capture to the frame processed "
                                        "(tracked, rules run, events handed to the spool)", labels=["camera"])
        for name, w in p.workers.items():
            _histogram(latency, [name], w.latency.buckets)
        yield infer
        yield latency

    def _publisher(self) -> Iterator[Metric]:
        pub = self.publisher
        if pub is None:
            return
        yield GaugeMetricFamily("edgecv_spool_depth", "Events in the spool, waiting for the broker's "
                                "acknowledgement", value=pub.spool.depth)
        yield CounterMetricFamily("edgecv_spool_dropped", "Oldest events dropped past the spool's bound (all runs)",
                                  value=pub.spool.dropped)
        yield GaugeMetricFamily("edgecv_mqtt_connected", "1 while the MQTT broker is connected, else 0",
                                value=1 if pub.connected else 0)
