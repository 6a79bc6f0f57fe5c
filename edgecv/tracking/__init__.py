"""Multi-object tracking: one ByteTrack-class tracker per camera.

``ByteTracker.update(detections, frames_skipped=0) -> Detections`` returns the
confirmed tracks of a frame with ``track_id`` set; ``ByteTracker.events`` lists the
lifecycle changes (``TrackEventKind``: new, lost, removed) of that call; on a frame the
detector skipped, ``ByteTracker.coast(image=None, hold=False)`` predicts (or holds) the tracks
instead. See ``bytetrack`` for the method and the exact lifecycle rules.
"""
from edgecv.tracking.bytetrack import ByteTracker, TrackerConfig, TrackEvent, TrackEventKind, bench_tracker, box_iou
from edgecv.tracking.kalman import BoxKalmanFilter, xyah_to_xyxy, xyxy_to_xyah

__all__ = [
    "BoxKalmanFilter",
    "ByteTracker",
    "TrackEvent",
    "TrackEventKind",
    "TrackerConfig",
    "bench_tracker",
    "box_iou",
    "xyah_to_xyxy",
    "xyxy_to_xyah",
]
