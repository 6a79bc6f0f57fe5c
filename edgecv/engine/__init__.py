"""Inference engine: backends (ONNX Runtime; TensorRT later), model adapters, registry.

Typical use::

    detector = build_detector("yolox_nano.onnx", conf=0.35, classes=["person"])
    detections = detector.detect([frame.image])[0]
"""

from edgecv.engine.adapters import Detector, Letterbox, Yolov8Detector, YoloxDetector
from edgecv.engine.backend import Backend, OnnxRuntimeBackend
from edgecv.engine.bench import bench_model
from edgecv.engine.coco import COCO_NAMES
from edgecv.engine.registry import BACKENDS, FAMILIES, build_detector, infer_family, load_labels, open_backend
from edgecv.engine.segmentation import SemanticSegmenter, Yolov8SegDetector

__all__ = [
    "BACKENDS",
    "COCO_NAMES",
    "FAMILIES",
    "Backend",
    "Detector",
    "Letterbox",
    "OnnxRuntimeBackend",
    "SemanticSegmenter",
    "Yolov8Detector",
    "Yolov8SegDetector",
    "YoloxDetector",
    "bench_model",
    "build_detector",
    "infer_family",
    "load_labels",
    "open_backend",
]
