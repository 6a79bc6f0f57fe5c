"""YAML configuration: load, ``${ENV}`` interpolation, validation into typed objects.

Every problem is reported as one line naming the field path, e.g.
``cameras.gate.zones.door.polygon: needs at least 3 points, got 2``.
Unknown keys are errors (a typo must not pass silently).
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import assets
from .types import (  # the one list of families; the engine maps them
    ANCHORS,
    DETECTOR_FAMILIES,
    SEGMENTER_FAMILIES,
)

NAME_RE = r"^[A-Za-z0-9_-]{1,64}$"
SECRET_KEYS = ("password", "username", "secret", "token")

# Bounds on what a config may be: configs are small, and these keep a hostile or absurd file from costing
# more than a fraction of a second and a few MB before it is rejected (all checked before anything walks it).
MAX_CONFIG_BYTES = 1 << 20  # the file
MAX_YAML_NODES = 100_000  # scalars, sequences and mappings, with every alias expanded
MAX_YAML_DEPTH = 64  # nesting of sequences and mappings
MAX_COORDINATE = 100_000.0  # px: zone, line and corridor coordinates
MAX_VERTICES = 1_000  # per polygon
MAX_DEVICE_INDEX = 1023  # V4L2 device index (a camera index must fit the capture API's int)
MAX_TOPIC_PREFIX = 256  # characters; MQTT allows topics of up to 65,535 bytes
MAX_BATCH = 64  # model.batch: frames inferred together
MAX_PARALLEL = 16  # model.parallel: frames inferred at the same time
MAX_DECODE_THREADS = 16  # cameras.<name>.decode_threads (OpenCV caps FFmpeg's threads at 16 too)


class ConfigError(Exception):
    """One or more configuration problems, each a single line naming the field."""

    def __init__(self, problems: list[str]):
        self.problems = [_one_line(p) for p in problems]
        super().__init__("\n".join(self.problems))


# control characters and everything str.splitlines() breaks at
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(text: str) -> str:
    """A key or value quoted in a problem may hold line breaks: escape them so one problem stays one line."""
    return _LINE_BREAKING.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


class _Model(BaseModel):
    # no float field accepts nan or inf (YAML's .nan/.inf): a threshold or a coordinate that compares false
    # with everything passes every bound check and never fires
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


Point = tuple[float, float]


def _check_points(points: list[Point], minimum: int, exact: bool = False) -> list[Point]:
    n = len(points)
    if exact and n != minimum:
        raise ValueError(f"needs exactly {minimum} points, got {n}")
    if n < minimum:
        raise ValueError(f"needs at least {minimum} points, got {n}")
    if n > MAX_VERTICES:
        raise ValueError(f"has {n} points, at most {MAX_VERTICES} are allowed")
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"coordinates must be finite numbers, got [{x:g}, {y:g}]")
        if x < 0 or y < 0:
            raise ValueError(f"coordinates must be >= 0 (source pixels), got [{x:g}, {y:g}]")
        if x > MAX_COORDINATE or y > MAX_COORDINATE:
            raise ValueError(f"coordinates must be <= {MAX_COORDINATE:g} (source pixels), got [{x:g}, {y:g}]")
    return points


def _check_polygon(points: list[Point]) -> list[Point]:
    _check_points(points, 3)
    area = 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1])))
    if area < 1.0:
        raise ValueError(f"encloses no area ({area:g} px²): its points are on one line or one spot")
    return points


class _RuleBase(_Model):
    anchor: Literal[ANCHORS] = Field("bottom_center", description="Point of the box tested against the geometry")  # type: ignore[valid-type]
    classes: Optional[list[str]] = Field(None, min_length=1, description="Only these labels (default: all)")
    min_frames: int = Field(3, ge=1, le=1000, description="Frames the new state must hold before an event (debounce)")
    cooldown_s: float = Field(0.0, ge=0, description="Minimum seconds between two events of this rule for one track")


class ZoneConfig(_RuleBase):
    polygon: list[Point] = Field(description="Polygon vertices in source pixels: 3 to 1000, coordinates 0 to 100000, "
                                 "enclosing an area of at least 1 px²")
    loiter_s: Optional[float] = Field(None, gt=0, description="Emit zone.loiter once a track stays this long")
    exit_on_lost: bool = Field(True, description="Emit zone.exit when a track inside the zone is removed")

    @field_validator("polygon")
    @classmethod
    def _poly(cls, v: list[Point]) -> list[Point]:
        return _check_polygon(v)


class LineConfig(_RuleBase):
    points: list[Point] = Field(description="Two points [[x1, y1], [x2, y2]] in source pixels, coordinates 0 to "
                                "100000, at least 1 px apart")
    reset: Optional[str] = Field(None, pattern=r"^daily@([01][0-9]|2[0-3]):[0-5][0-9]$",
                                 description="When the line's retained MQTT counters go back to 0: daily@HH:MM "
                                 "(local time); default: only by the reset command")

    @field_validator("points")
    @classmethod
    def _pts(cls, v: list[Point]) -> list[Point]:
        _check_points(v, 2, exact=True)
        if math.dist(v[0], v[1]) < 1.0:
            raise ValueError(f"the two points must be at least 1 px apart, got {math.dist(v[0], v[1]):g} px")
        return v


class ObjectEventsConfig(_Model):
    new: bool = Field(True, description="Emit object.new when a track is confirmed")
    lost: bool = Field(True, description="Emit object.lost when a confirmed track is removed")
    classes: Optional[list[str]] = Field(None, min_length=1, description="Only these labels (default: all)")


class ReconnectConfig(_Model):
    initial_s: float = Field(0.5, gt=0, le=600, description="First delay; doubled after each failure")
    max_s: float = Field(30.0, gt=0, le=3600, description="Largest delay")

    @model_validator(mode="after")
    def _order(self) -> "ReconnectConfig":
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s:g}) must be >= initial_s ({self.initial_s:g})")
        return self


class CollisionConfig(_Model):
    """Forward-collision warning: time to contact from the growth of a tracked box (edgecv/analytics/driving.py)."""

    enabled: bool = Field(True, description="Emit collision.warning events")
    ttc_s: float = Field(2.0, gt=0, le=60, description="Warn when the estimated time to contact is at most this (seconds)")
    window: int = Field(8, ge=2, le=120, description="Recent frames of a track fitted (least squares of log box size vs time)")
    min_frames: int = Field(4, ge=2, le=120, description="Samples of the track in the window needed before a warning")
    min_growth: float = Field(0.05, ge=0, le=10, description="Least relative growth of the box size across the window (0.05 = 5 %)")
    scale: Literal["sqrt_area", "height", "width"] = Field("sqrt_area", description="Box size measure whose growth is fitted")
    cooldown_s: float = Field(3.0, ge=0, description="Minimum seconds between two warnings for one track")
    classes: Optional[list[str]] = Field(None, min_length=1, description="Only these labels (default: all)")
    ego_path: Literal["auto", "drivable", "corridor", "either", "both"] = Field(
        "auto", description="Which objects are in the vehicle's path: on the drivable mask, in ego_corridor, either, "
        "both; auto: ego_corridor when given, else the drivable mask")
    ego_corridor: Optional[list[Point]] = Field(None, description="Polygon of the vehicle's own path in source pixels "
                                                "(anchor inside); bounds as a zone's polygon")
    anchor: Literal[ANCHORS] = Field("bottom_center", description="Point of the box tested against ego_corridor")  # type: ignore[valid-type]
    min_drivable: float = Field(0.2, gt=0, le=1, description="On the drivable mask: at least this share of the strip under the box is drivable")

    @field_validator("ego_corridor")
    @classmethod
    def _poly(cls, v: Optional[list[Point]]) -> Optional[list[Point]]:
        return None if v is None else _check_polygon(v)

    @model_validator(mode="after")
    def _consistent(self) -> "CollisionConfig":
        if self.min_frames > self.window:
            raise ValueError(f"min_frames ({self.min_frames}) must be <= window ({self.window})")
        if self.ego_path in ("corridor", "both") and self.ego_corridor is None:
            raise ValueError(f"ego_path {self.ego_path!r} needs an ego_corridor polygon")
        return self

    @property
    def uses_drivable(self) -> bool:
        """Whether the drivable mask decides (alone or with the corridor) who is in the ego path."""
        return self.ego_path in ("drivable", "both", "either") or (self.ego_path == "auto" and self.ego_corridor is None)


class DrivableZoneConfig(_Model):
    """zone.enter / zone.exit with zone = the mask's name when a track gets onto / leaves the mask."""

    enabled: bool = Field(True, description="Emit zone.enter / zone.exit for the drivable area")
    mask: str = Field("drivable", min_length=1, description="Semantic class used as the zone (also the event's zone name)")
    min_drivable: float = Field(0.2, gt=0, le=1, description="On the mask: at least this share of the strip under the box is in it")
    classes: Optional[list[str]] = Field(None, min_length=1, description="Only these labels (default: all)")
    min_frames: int = Field(3, ge=1, le=1000, description="Frames the new state must hold before an event (debounce)")
    cooldown_s: float = Field(0.0, ge=0, description="Minimum seconds between two events of this rule for one track")
    exit_on_lost: bool = Field(True, description="Emit zone.exit when a track inside the area is removed")


class DrivingConfig(_Model):
    collision: Optional[CollisionConfig] = Field(None, description="Forward-collision warnings (absent: off)")
    drivable_zone: Optional[DrivableZoneConfig] = Field(None, description="Drivable-area zone events (absent: off)")


Polygon = Annotated[list[Point], AfterValidator(_check_polygon)]  # a problem names its index: mask[1]


class MotionGateConfig(_Model):
    """Skip inference on frames where nothing moves (edgecv/sources/gate.py): a cheap test on a small grey copy of
    the frame against a running background, on the capture thread."""

    enabled: bool = Field(False, description="Skip the detector on frames with no motion and no moving track (the "
                          "tracks are held where they are); the first frame and the one after a reconnect are "
                          "always inferred")
    sensitivity: float = Field(0.5, ge=0, le=1, description="0 to 1: how small a grey-level change counts as motion "
                               "(0: 64 levels, 1: 4 levels)")
    min_area: float = Field(150.0, ge=0, le=100_000_000, description="Changed area in source pixels² "
                            "that counts as motion")
    mask: Optional[list[Polygon]] = Field(None, min_length=1, description="Polygons in source pixels whose changes "
                                          "are ignored (trees, screens, clocks); bounds as a zone's polygon")


class DetectConfig(_Model):
    """Which frames the detector runs on; the tracker predicts the others, and the rules see every frame."""

    enabled: bool = Field(True, description="Run the detector on this camera (false: never; the source keeps "
                          "streaming and tracks age out)")
    every_n: int = Field(1, ge=1, le=1000, description="Run the detector on one frame in N; the tracker predicts "
                         "the frames between, and rules and events still run on every frame")
    min_fps: float = Field(3.0, ge=0, le=1000, description="every_n never runs the detector less often than this "
                           "many times per second of the source's frame rate (on a 5 fps camera every_n 2 is taken "
                           "as 1): below about 3 detections a second the tracker loses walking people between them "
                           "(README, Skipping frames); logged once when it applies; 0: every_n as set")
    defer_when_busy: bool = Field(True, description="With every_n above 1: a frame due for the detector while "
                                  "other cameras' frames already waiting would keep it 100 ms or more is skipped too, and the next one "
                                  "inferred instead (at most every_n - 1 frames later, never below min_fps), so a "
                                  "burst of due frames does not queue up: latency stays bounded near capacity")
    motion_gate: MotionGateConfig = Field(MotionGateConfig(), description="Skip the detector while nothing moves")

    @property
    def gated(self) -> bool:
        """Whether some frames skip inference (False: every frame is inferred, as without this section)."""
        return not self.enabled or self.every_n > 1 or self.motion_gate.enabled


SourceType = Literal["auto", "file", "rtsp", "stream", "v4l2", "gstreamer"]


class CameraConfig(_Model):
    source: Union[str, int] = Field(description="File path, rtsp:// URL, /dev/videoN or device index 0 to 1023, or "
                                    "GStreamer pipeline (at most 4096 characters)")
    type: SourceType = Field("auto", description="Source kind; auto: from `source`")
    realtime: bool = Field(True, description="Files: play at their own frame rate (false: as fast as possible, no drops)")
    loop: bool = Field(False, description="Files: start again at the end")
    max_fps: Optional[float] = Field(None, gt=0, le=1000, description="Process at most this many frames per second")
    pace_fps: Optional[float] = Field(None, gt=0, le=1000, description="Files with realtime: false: read at most this "
                                      "many frames per second, still dropping none (steady, reproducible replay)")
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="Network streams: give up opening after this")
    read_timeout_s: float = Field(10.0, gt=0, le=600, description="Network streams: give up a read after this")
    stall_timeout_s: float = Field(10.0, gt=0, le=3600, description="No frame for this long: stalled, reconnect")
    decode_threads: Union[Literal["auto"], int] = Field(
        "auto", description="FFmpeg decoding threads (files and network streams), 1 to 16. FFmpeg decodes H.264, "
        "H.265 and MPEG-4 frames in parallel by holding back one frame per extra thread, each a frame interval of "
        "latency (measured: README, Capacity, FFmpeg's frame threads). auto: 1 for network streams (a camera's "
        "events on time); FFmpeg's own choice, one per core, for files (throughput). Raise it for a stream one core "
        "cannot decode at its frame rate (4K)")
    reconnect: ReconnectConfig = Field(ReconnectConfig(), description="Capped exponential backoff between retries")
    zones: dict[str, ZoneConfig] = Field(default_factory=dict, description="Polygon zones by name")
    lines: dict[str, LineConfig] = Field(default_factory=dict, description="Counting lines by name")
    objects: ObjectEventsConfig = Field(ObjectEventsConfig(), description="object.new / object.lost events")
    driving: Optional[DrivingConfig] = Field(None, description="Dash-cam rules: collision warning, drivable-area zone")
    detect: DetectConfig = Field(DetectConfig(), description="Which frames the detector runs on (every_n, motion_gate)")

    @field_validator("decode_threads", mode="before")
    @classmethod
    def _decode_threads(cls, v: Any) -> Any:
        return _auto_or_count(v, MAX_DECODE_THREADS)

    @field_validator("pace_fps")
    @classmethod
    def _pace_needs_offline(cls, v: Optional[float], info: Any) -> Optional[float]:
        if v is not None and info.data.get("realtime", False):
            raise ValueError("needs realtime: false (realtime: true already plays a file at its own frame rate)")
        return v

    @field_validator("source", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # YAML's yes/no/true/false would otherwise become device index 1/0
            raise ValueError(f"expected a file path, URL, GStreamer pipeline or device index, got {v!r}")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: Union[str, int]) -> Union[str, int]:
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        if isinstance(v, str) and ("\0" in v or len(v) > 4096):
            raise ValueError("must be at most 4096 characters, without NUL")
        index = v if isinstance(v, int) else (int(v) if v.strip().isdigit() else None)
        if index is not None and not 0 <= index <= MAX_DEVICE_INDEX:
            raise ValueError(f"device index must be between 0 and {MAX_DEVICE_INDEX}, got {index}")
        return v

    @property
    def kind(self) -> str:
        """The source type, inferred from `source` when `type` is auto."""
        if self.type != "auto":
            return self.type
        s = self.source
        if isinstance(s, int) or (isinstance(s, str) and (s.isdigit() or s.startswith("/dev/video"))):
            return "v4l2"
        low = s.lower()
        if low.startswith(("rtsp://", "rtsps://")):
            return "rtsp"
        if low.startswith(("http://", "https://", "rtmp://", "udp://", "tcp://", "srt://")):
            return "stream"
        if "!" in s:
            return "gstreamer"
        return "file"


class TLSConfig(_Model):
    ca_file: Optional[str] = Field(None, description="CA certificate(s) that signed the broker's certificate")
    cert_file: Optional[str] = Field(None, description="Client certificate (mTLS), with key_file")
    key_file: Optional[str] = Field(None, description="Client private key (mTLS), with cert_file")
    insecure: bool = Field(False, description="Skip hostname verification (testing only)")

    @model_validator(mode="after")
    def _pair(self) -> "TLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (client certificate)")
        return self


class SpoolConfig(_Model):
    path: Optional[str] = Field(None, description="Folder of the on-disk event spool (default: user state dir)")
    max_mb: float = Field(256, gt=0, le=1_000_000, description="Bound of the spool; past it the oldest are dropped")


class SnapshotConfig(_Model):
    enabled: bool = Field(False, description="Publish a JPEG of an event's frame on <prefix>/<node>/<camera>/snapshot")
    max_hz: float = Field(1.0, gt=0, le=30, description="Most snapshots per second and camera (frames with events only)")
    quality: int = Field(80, ge=10, le=100, description="JPEG quality")
    draw_masks: bool = Field(True, description="Draw instance masks and the drivable area / lanes when present")


class HomeAssistantConfig(_Model):
    enabled: bool = Field(False, description="Announce this node's state topics as Home Assistant entities (MQTT "
                          "discovery, retained)")
    discovery_prefix: str = Field("homeassistant", pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$", max_length=256,
                                  description="Home Assistant's discovery prefix (letters, digits, _ and -, levels "
                                  "separated by /)")


class CommandsConfig(_Model):
    enabled: bool = Field(False, description="Subscribe to the command topics (<prefix>/<node>/.../set, "
                          "lines/<line>/reset); the broker's ACLs decide who may publish them")


class MqttConfig(_Model):
    enabled: bool = Field(True, description="Publish to an MQTT broker (false: console only)")
    host: str = Field("localhost", min_length=1, description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS)")
    client_id: Optional[str] = Field(None, min_length=1, max_length=128, description="Default: edgecv-<node_id>")
    username: Optional[str] = Field(None, max_length=65535, description="Broker user; use ${ENV} for secrets")
    password: Optional[str] = Field(None, max_length=65535,
                                    description="Broker password; use ${ENV} for secrets (never logged)")
    qos: int = Field(1, ge=0, le=2, description="QoS of event messages")
    topic_prefix: str = Field("edgecv", min_length=1, description="Topics are <prefix>/<node_id>/...; at most 256 "
                              "characters, no control characters, + or #, no empty level")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval")
    protocol: Literal["3.1.1", "5"] = Field("5", description="MQTT protocol version (5: the broker announces "
                                            "its maximum packet size, events carry user properties schema and "
                                            "event_id; a broker that refuses 5 gets 3.1.1, logged once)")
    max_packet_size: Optional[int] = Field(None, ge=128, le=268_435_455, description="The broker's maximum packet "
                                           "size in bytes (Mosquitto's max_packet_size), when it does not announce it "
                                           "(MQTT 3.1.1); default: announced (MQTT 5) or learned")
    tls: Optional[TLSConfig] = Field(None, description="TLS to the broker (absent: plain TCP)")
    publish_tracks: bool = Field(False, description="Publish per-frame track lists (QoS 0, rate-limited)")
    tracks_max_hz: float = Field(2.0, gt=0, le=100, description="Most track-list messages per second and camera")
    stats_interval_s: float = Field(10.0, gt=0, le=3600, description="Period of <prefix>/<node>/stats messages")
    spool: SpoolConfig = Field(SpoolConfig(), description="Disk spool holding events until the broker has them")
    snapshots: SnapshotConfig = Field(SnapshotConfig(), description="Annotated JPEG snapshots of event frames (QoS 0)")
    homeassistant: HomeAssistantConfig = Field(HomeAssistantConfig(), description="Home Assistant MQTT discovery")
    commands: CommandsConfig = Field(CommandsConfig(), description="Commands over MQTT (detection on/off, snapshot, "
                                     "line counter reset, reload)")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if len(v) > MAX_TOPIC_PREFIX:
            raise ValueError(f"must be at most {MAX_TOPIC_PREFIX} characters, got {len(v)}")
        if any(c in v for c in "+#") or v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError(f"must not contain + or # or an empty level ('/' at either end, '//'), got {v!r}")
        if _LINE_BREAKING.search(v):
            raise ValueError("must not contain control characters (MQTT topics are printable UTF-8)")
        return v


class TensorRTBuild(_Model):
    """How an engine is built from the ONNX model the first time (`backend: tensorrt`, or auto on a GPU). The
    environment variables EDGECV_TRT_PRECISION, EDGECV_TRT_MAX_BATCH and EDGECV_TRT_CALIB_DIR override these."""

    precision: Literal["fp16", "fp32", "int8"] = Field("fp16", description="Engine precision; int8 needs calib_dir")
    max_batch: int = Field(4, ge=1, le=64, description="Largest batch (frames of several cameras at once) for a "
                           "model with a dynamic batch dimension; a fixed batch wins")
    calib_dir: Optional[str] = Field(None, description="INT8: a folder of images like the ones the camera sees")
    workspace_mb: int = Field(1024, ge=16, le=1 << 20, description="Builder workspace in MB")

    @model_validator(mode="after")
    def _int8(self) -> "TensorRTBuild":
        if self.precision == "int8" and not self.calib_dir:
            raise ValueError("precision int8 needs calib_dir (a folder of images for calibration)")
        return self


def _auto_or_count(v: Any, most: int) -> Any:
    """``auto`` or a number 1 to ``most``."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= most):
        return v
    raise ValueError(f"expected auto or a number 1 to {most}, got {v!r}")


class ModelConfig(_Model):
    name: Optional[str] = Field(None, pattern=NAME_RE, description="Name in stats and messages (default: file name without extension)")
    path: str = Field(description="ONNX model (or TensorRT engine); relative paths also searched in EDGECV_ASSETS")
    family: Literal[("auto", *DETECTOR_FAMILIES, *SEGMENTER_FAMILIES)] = Field(  # type: ignore[valid-type]
        "auto", description="Output decoder: detectors yolox, yolov8, yolov8-seg (instance masks); semseg: "
        "semantic masks (TwinLiteNet); auto: from the model")
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field("auto", description="Inference runtime")
    conf: float = Field(0.35, ge=0, le=1, description="Confidence threshold")
    iou: float = Field(0.5, ge=0, le=1, description="NMS IoU threshold")
    classes: Optional[list[str]] = Field(None, min_length=1, description="Keep only these labels")
    labels: Optional[str] = Field(None, description="Labels file, one name per line (overrides the model's names)")
    threads: Optional[int] = Field(None, ge=1, le=256, description="CPU threads of one inference (default: half the cores; with "
                                   "`parallel` auto, cores / threads inferences run at once; measured: README, Capacity)")
    batch: Union[Literal["auto"], int] = Field(
        "auto", description="Most frames (of different cameras) inferred together: a number 1 to 64, or auto: 1 with "
        "ONNX Runtime on the CPU (batching measured not to pay there, README Batching), the engine's largest batch "
        "on a GPU; a model with a fixed batch runs its own (`edgecv model dynamic-batch` makes it dynamic)")
    parallel: Union[Literal["auto"], int] = Field(
        "auto", description="Most frames (of different cameras) inferred at the same time, each on a thread of its "
        "own: a number 1 to 16, or auto: on the CPU the cores divided by `threads` (2 on 2 cores), 1 on a GPU "
        "(its frames are batched instead) and with TensorRT; measured: README, Capacity")
    tensorrt: TensorRTBuild = Field(TensorRTBuild(), description="TensorRT engine build options")

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        return _auto_or_count(v, MAX_BATCH)

    @field_validator("parallel", mode="before")
    @classmethod
    def _parallel(cls, v: Any) -> Any:
        return _auto_or_count(v, MAX_PARALLEL)

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path).stem or "model"


class TrackerSection(_Model):
    track_thresh: float = Field(0.5, ge=0, le=1, description="Detections at or above: first association")
    low_thresh: float = Field(0.1, ge=0, le=1, description="Detections between this and track_thresh: second association")
    new_track_thresh: float = Field(0.5, ge=0, le=1, description="Unmatched detections at or above start a (tentative) track")
    confirm_thresh: Optional[float] = Field(
        None, ge=0, le=1, description="Mean detection score a tentative track needs to be confirmed (reported); "
        "default: by the detector's score calibration, 0.65 for yolox, 0.6 for yolov8")
    report_thresh: Optional[float] = Field(
        None, ge=0, le=1, description="A confirmed track is reported only while its detection scores confirm_thresh "
        "or the moving average of its detection scores is at least this; default: by the detector's score "
        "calibration, 0.6 for yolox, 0.55 for yolov8")
    match_thresh: float = Field(0.9, gt=0, le=1, description="Largest 1-IoU*score cost accepted in the first association")
    low_match_thresh: float = Field(0.6, gt=0, le=1, description="Largest 1-IoU cost accepted in the low-score association")
    min_hits: int = Field(2, ge=1, le=100, description="Consecutive matched frames before a track is confirmed")
    lost_buffer_s: float = Field(1.5, gt=0, le=600, description="How long a lost track can be recovered with its id")
    appearance_weight: float = Field(
        0.7, ge=0, le=10, description="Weight of the appearance cue (the colour layout of each box, 0..1 apart) "
        "added to the IoU cost of the association: tells apart objects whose boxes overlap; 0 turns it off")
    motion_compensation: Literal["off", "sparse_flow", "ecc", "auto"] = Field(
        "auto", description="Camera-motion compensation (moving cameras): sparse_flow, ecc, auto (sparse flow, "
        "used only while the camera is seen to move) or off")

    @field_validator("motion_compensation", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _order(self) -> "TrackerSection":
        if self.low_thresh > self.track_thresh:
            raise ValueError(f"low_thresh ({self.low_thresh:g}) must be <= track_thresh ({self.track_thresh:g})")
        if self.new_track_thresh < self.track_thresh:
            raise ValueError(f"new_track_thresh ({self.new_track_thresh:g}) must be >= track_thresh "
                             f"({self.track_thresh:g})")
        return self


class ConsoleConfig(_Model):
    enabled: bool = Field(True, description="Print one line per event on stdout")
    format: Literal["text", "json"] = Field("text", description="text: readable line; json: the MQTT payload")


class HttpConfig(_Model):
    enabled: bool = Field(False, description="Serve the operator HTTP endpoints: /metrics (Prometheus), /healthz, "
                          "/readyz, and the live annotated preview (/, /cameras/<name>/latest.jpg, stream.mjpeg)")
    allow_remote: bool = Field(False, description="Allow `host` to be an address other than loopback (metrics and "
                               "previews reveal camera names, rates and images: put them behind a firewall or proxy)")
    host: str = Field("127.0.0.1", min_length=1, max_length=253, description="Address to listen on (loopback "
                      "unless `allow_remote: true`)")
    port: int = Field(9108, ge=1, le=65535, description="TCP port to listen on")
    preview_fps: float = Field(5.0, gt=0, le=30, description="Most frames a second a preview stream (MJPEG) or page "
                               "sends; frames are drawn and encoded only while someone is watching")

    @field_validator("host")
    @classmethod
    def _loopback(cls, v: str, info: Any) -> str:
        if not info.data.get("allow_remote", False) and not is_loopback(v):
            raise ValueError(f"{v!r} is not a loopback address: metrics and previews reveal camera names, rates and "
                             "images; set http.allow_remote: true to listen on it")
        return v


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (localhost, 127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


class Config(_Model):
    node_id: str = Field(pattern=NAME_RE, description="This node's id in MQTT topics and events")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging threshold (stderr)")
    log_format: Literal["text", "json"] = Field("text", description="stderr log lines: text (no timestamp of its "
                                                "own under journald), or json: one object per line with time, level, "
                                                "logger, camera and message")
    mqtt: MqttConfig = MqttConfig()
    console: ConsoleConfig = ConsoleConfig()
    http: HttpConfig = Field(HttpConfig(), description="Operator HTTP server: Prometheus metrics, health and "
                             "readiness checks, live annotated preview (off by default)")
    model: Optional[ModelConfig] = Field(None, description="The detection model (or several models in `models`)")
    models: Optional[list[ModelConfig]] = Field(
        None, min_length=1, description="Models run on every frame: one detector (tracked) and any semseg segmenters")
    tracker: TrackerSection = TrackerSection()
    failure_limit: int = Field(50, ge=1, le=100_000, description="Frames in a row whose inference or processing "
                               "fails before a camera is given up (state failed); when inference fails that often, "
                               "or every camera is given up, the daemon exits 1 so that a service manager restarts it")
    stuck_after_s: float = Field(30.0, gt=0, le=3600, description="A pipeline thread busy on one frame this long (an "
                                 "inference that hangs, a frame being processed), or a capture read blocked this long "
                                 "past its read timeout, is stuck: the health check fails and systemd's watchdog pings "
                                 "stop, so that the service is restarted")
    cameras: dict[str, CameraConfig] = Field(min_length=1)
    # where the file was loaded from (for resolving relative paths); not a YAML key
    base_dir: Optional[str] = Field(None, exclude=True)
    # the key the models were written under ("model": one section, normalised into `models`), for messages
    _models_key: str = PrivateAttr("models")

    @field_validator("cameras")
    @classmethod
    def _names(cls, v: dict[str, CameraConfig]) -> dict[str, CameraConfig]:
        for name, cam in v.items():
            if not re.match(NAME_RE, name):
                raise ValueError(f"camera name {name!r} may only use letters, digits, '_' and '-'")
            for kind, rules in (("zones", cam.zones), ("lines", cam.lines)):
                for rname in rules:
                    if not re.match(NAME_RE, rname):
                        raise ValueError(f"{name}.{kind}: name {rname!r} may only use letters, digits, '_' and '-'")
        return v

    @model_validator(mode="after")
    def _model_sections(self) -> "Config":
        # problems are "field.path: message" (see _format_error) so that they name the field
        if self.model is None and self.models is None:
            raise ValueError("model: required field is missing (or give `models`, a list of model sections)")
        if self.model is not None and self.models is not None:
            raise ValueError("models: give either `model` or `models`, not both")
        if self.model is not None:  # one internal shape: `model: {...}` is a one-item `models` list
            object.__setattr__(self, "models", [self.model])  # frozen model, still being validated
            object.__setattr__(self, "model", None)
            self._models_key = "model"
        seen: dict[str, str] = {}
        detectors: list[str] = []
        for path, m in self.model_sections:
            other = seen.setdefault(m.display_name, path)
            if other != path:
                raise ValueError(f"{path}.name: duplicate model name {m.display_name!r} (also {other}); set `name`")
            if m.family in DETECTOR_FAMILIES:
                detectors.append(path)
        if len(detectors) > 1:
            raise ValueError(f"{detectors[1]}.family: only one detector model is tracked ({detectors[0]} is one); "
                             f"the others must be {', '.join(SEGMENTER_FAMILIES)}")
        if self.models is not None and all(m.family in SEGMENTER_FAMILIES for m in self.models):
            raise ValueError(f"models: needs one detector model ({', '.join(DETECTOR_FAMILIES)}), got only segmenters")
        return self

    @property
    def model_sections(self) -> list[tuple[str, ModelConfig]]:
        """(field path as written, section) of every model: [("model", m)] when the file has `model:`, else
        [("models[0]", m0), ("models[1]", m1), ...]."""
        if self._models_key == "model":
            return [("model", m) for m in self.models or []]
        return [(f"models[{i}]", m) for i, m in enumerate(self.models or [])]


# ----------------------------------------------------------------------------------------------
# loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, problems: list[str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; unset variables are problems."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def sub(m: re.Match) -> str:
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is not None:
                    return m.group(2)
                problems.append(f"{path}: environment variable {m.group(1)} is not set")
                return ""
            return val

        return _ENV_RE.sub(sub, node)
    return node


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "union[")):
            continue
        elif str(part) in ("int", "str") and out.endswith(".source"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the location of an unknown key (for 'did you mean')."""
    cur: Any = model
    dict_key_next = False
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if dict_key_next:  # a key of a dict-valued field (a camera or zone name), even one named like a field
            dict_key_next = False
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(str(part))
        if field is None:
            return []
        dict_key_next = _is_dict(field.annotation)
        cur = _unwrap(field.annotation)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [name for name, f in cur.model_fields.items() if not f.exclude]
    return []


def _is_dict(ann: Any) -> bool:
    """dict[...] or Optional[dict[...]]."""
    if get_origin(ann) is dict:
        return True
    return get_origin(ann) is Union and any(_is_dict(a) for a in get_args(ann))


def _unwrap(ann: Any) -> Any:
    """Optional[X] -> X, dict[str, X] -> X, list[X] -> X."""
    args = getattr(ann, "__args__", None)
    if not args:
        return ann
    for a in reversed(args):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        inner = _unwrap(a) if getattr(a, "__args__", None) else None  # Optional[list[X]] -> X
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return args[-1]


def _is_list(ann: Any) -> bool:
    """list[...] or Optional[list[...]]."""
    if get_origin(ann) is list:
        return True
    return get_origin(ann) is Union and any(_is_list(a) for a in get_args(ann))


_VALUE_ERROR = "Value error, "
_ASSERTION = "Assertion failed, "


def _unknown_key(loc: tuple, path: str, root: type[BaseModel]) -> str:
    """'<path>: unknown key', with the closest valid key, else the valid keys, when they are known."""
    key = str(loc[-1]) if loc else "?"
    known = _known_keys(root, loc)
    hint = difflib.get_close_matches(key, known, n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else (f" (valid keys: {', '.join(known)})" if known else "")
    return f"{path}: unknown key{extra}"


def _strip_prefix(msg: str) -> str:
    """The message without pydantic's 'Value error, ' or 'Assertion failed, ' prefix."""
    if msg.startswith(_VALUE_ERROR):
        return msg[len(_VALUE_ERROR):]
    if msg.startswith(_ASSERTION):
        return msg[len(_ASSERTION):]
    return msg


def _with_input(msg: str, err: dict, path: str, typ: str) -> str:
    """The message followed by the rejected value (redacted, shortened), unless it is a secret, a mapping or a list."""
    secret = any(s in path.lower() for s in SECRET_KEYS)
    if "input" not in err or secret or typ in ("value_error",) or isinstance(err["input"], (dict, list)):
        return msg
    shown = repr(redact_location(err["input"]) if isinstance(err["input"], str) else err["input"])
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{msg} (got {shown})"


def _format_error(err: dict, root: type[BaseModel]) -> str:
    loc = err.get("loc", ())
    path = _loc(loc) or "(top level)"
    typ = err.get("type", "")
    msg = str(err.get("msg", "invalid"))
    if not loc and re.match(r"^(Value error, )?[A-Za-z_][\w.\[\]-]*: ", msg):  # a cross-field check naming its field
        return msg[len(_VALUE_ERROR):] if msg.startswith(_VALUE_ERROR) else msg
    if typ == "extra_forbidden":
        return _unknown_key(loc, path, root)
    if typ == "missing":
        return f"{path}: required field is missing"
    return f"{path}: {_with_input(_strip_prefix(msg), err, path, typ)}"


def parse(data: Any, source: str = "config", base_dir: Optional[Path] = None) -> Config:
    """Validate an already-loaded YAML tree. Raises ConfigError with one line per problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}"])
    problems: list[str] = []
    data = _interpolate(data, "", problems)
    if problems:
        raise ConfigError(problems)
    lines: list[str] = []
    if "base_dir" in data:  # set by the loader, not a YAML key
        lines.append(_format_error({"type": "extra_forbidden", "loc": ("base_dir",)}, Config))
    try:
        cfg = Config.model_validate({**data, "base_dir": str(base_dir) if base_dir else None})
    except ValidationError as e:
        for err in e.errors(include_url=False):
            line = _format_error(err, Config)
            if line not in lines:
                lines.append(line)
        raise ConfigError(lines) from None
    if lines:
        raise ConfigError(lines)
    problems.extend(check_files(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that rejects duplicate keys (a typo that repeats `zones:` must not drop zones)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys written here override the merged ones, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the constructor below reports it
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _check_size(root: yaml.Node, where: str) -> None:
    """Reject a document whose node graph, with every alias expanded, is too big, too deep or cyclic.

    The composed graph shares aliased nodes, so it stays small even for an alias bomb; its expanded size is
    counted here without expanding anything (each node's size computed once).
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    active: set[int] = set()

    def walk(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key], depths[key]
        if key in active:
            raise ConfigError([f"{where}: invalid YAML: an alias refers to a node that contains it (a cycle)"])
        active.add(key)
        size, depth = 1, 1
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        for child in children:
            n, d = walk(child)
            size, depth = size + n, max(depth, d + 1)
            if size > MAX_YAML_NODES:
                raise ConfigError([f"{where}: invalid YAML: more than {MAX_YAML_NODES:,} values once its aliases are "
                                   "expanded (an alias bomb?)"])
            if depth > MAX_YAML_DEPTH:
                raise ConfigError([f"{where}: invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep"])
        active.discard(key)
        sizes[key], depths[key] = size, depth
        return size, depth

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * MAX_YAML_DEPTH + 200))
    walk(root)


def load_yaml(text: str, where: str) -> Any:
    """A YAML document, checked against the bounds above before it is built into Python objects."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, where)
        return loader.construct_document(node)
    except RecursionError:  # nesting deeper than the parser itself can take, before the bounds can be checked
        raise ConfigError([f"{where}: invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep"]) from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError([f"{where}: invalid YAML: a value cannot be read: {_one_line(str(e))[:120]}"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"{at}: invalid YAML: {problem}"]) from None
    finally:
        loader.dispose()


def load(path: str | os.PathLike) -> Config:
    """Read, interpolate and validate a YAML config file."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError([f"{p}: is a folder, not a config file"])
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{p}: config file is larger than {MAX_CONFIG_BYTES // 1024} KiB"])
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: config file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read config file: {getattr(e, 'strerror', None) or e}"]) from None
    data = load_yaml(text, str(p))
    if data is None:
        raise ConfigError([f"{p}: config file is empty"])
    return parse(data, source=str(p), base_dir=p.resolve().parent)


def resolve_path(cfg: Config, value: str) -> Optional[Path]:
    """The file a config value names, or None when it cannot be found (or the name cannot be a file)."""
    try:
        return assets.resolve(value, Path(cfg.base_dir) if cfg.base_dir else None)
    except (OSError, ValueError):  # e.g. ENAMETOOLONG, EACCES on a parent folder, an embedded NUL
        return None


def _missing(cfg: Config, value: str) -> str:
    """Why a file the config names is not usable: not found, or something that is not a regular file."""
    p = Path(os.path.expanduser(value))
    if not p.is_absolute() and cfg.base_dir:
        p = Path(cfg.base_dir) / p
    try:
        if p.is_dir():
            return "is a folder, not a file"
        if p.exists():
            return "is not a regular file (a device or a socket?)"
    except OSError:
        pass
    return "file not found"


def check_files(cfg: Config) -> list[str]:
    """Files the config names must exist: model, labels, TLS files, file sources."""
    problems: list[str] = []
    roots = ", ".join(str(r) for r in assets.asset_roots())
    for key, model in cfg.model_sections:
        if resolve_path(cfg, model.path) is None:
            problems.append(f"{key}.path: file not found: {model.path} (also searched {roots})")
        if model.labels and resolve_path(cfg, model.labels) is None:
            problems.append(f"{key}.labels: file not found: {model.labels}")
    if cfg.mqtt.tls:
        for name in ("ca_file", "cert_file", "key_file"):
            val = getattr(cfg.mqtt.tls, name)
            if val and resolve_path(cfg, val) is None:
                problems.append(f"mqtt.tls.{name}: file not found: {val}")
    for cam_name, cam in cfg.cameras.items():
        if cam.kind == "file" and resolve_path(cfg, str(cam.source)) is None:
            problems.append(f"cameras.{cam_name}.source: {_missing(cfg, str(cam.source))}: "
                            f"{redact_location(str(cam.source))} (also searched {roots})")
    return problems


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:/{1,2})(.*)$", re.S)  # "rtsp://", also "rtsp:/" (a typo)


def redact_location(location: str) -> str:
    """A camera source with the URL's credentials hidden: ``rtsp://user:p@ss/w rd@host/x`` -> ``rtsp://user:***@host/x``.

    The userinfo is everything between the scheme and the *last* ``@`` (a password may hold ``@``, ``/``,
    ``:``, spaces or anything else, and a mistyped scheme such as ``rstp://`` or ``rtsp:/`` still counts);
    the user name, up to its first ``:``, stays visible. A location without a scheme is only touched when it
    has a ``:`` before its last ``@`` (``user:pass@host``), so a file path with an ``@`` stays as it is.
    """
    text = str(location)
    at = text.rfind("@")
    if at < 0:
        return text
    m = _SCHEME.match(text)
    scheme, rest = (m.group(1), m.group(2)) if m else ("", text)
    at = rest.rfind("@")
    if at < 0 or (not scheme and ":" not in rest[:at]):
        return text
    userinfo = rest[:at]
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    return f"{scheme}{user + ':' if user else ''}***@{rest[at + 1:]}"


def redact(text: str, *locations: str) -> str:
    """``text`` with each of ``locations`` replaced by its redacted form, and credentials of any other URL in it
    hidden as far as free text allows (up to the last ``@`` before the next white space)."""
    out = str(text)
    for loc in locations:
        if loc and "@" in loc:
            out = out.replace(loc, redact_location(loc))
    return re.sub(r"\b([A-Za-z][A-Za-z0-9+.-]*:/{1,2})(\S*)@", lambda m: redact_location(m.group(0) + "x")[:-1], out)


def reference_markdown() -> str:
    """The configuration reference (README) generated from the models' fields and descriptions."""

    rows: list[str] = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def type_name(ann: Any) -> str:
        text = str(ann).replace("typing.", "").replace("NoneType", "None")
        text = re.sub(r"<class '([^']+)'>", r"\1", text)
        text = re.sub(r"Annotated\[(.+?), AfterValidator\([^)]*\)\]", r"\1", text)  # a checked item type
        return re.sub(r"edgecv\.config\.(\w+)", r"\1", text).replace("|", "\\|")

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            key = f"{prefix}{name}"
            ann = field.annotation
            inner = _unwrap(ann)
            is_dict = typing.get_origin(ann) is dict
            default = "required" if field.is_required() else (
                "" if isinstance(field.default, BaseModel) or field.default_factory else repr(field.default))
            symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "min length", "max_length": "max length"}
            bounds = ", ".join(f"{symbols[k]} {getattr(m, k)}" for m in field.metadata for k in symbols if hasattr(m, k))
            desc = (field.description or "") + (f" ({bounds})" if bounds else "")
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                if is_dict:
                    rows.append(f"| `{key}.<name>` | mapping of {inner.__name__} | | {desc} |")
                    walk(inner, f"{key}.<name>.")
                elif _is_list(ann):
                    rows.append(f"| `{key}[]` | list of {inner.__name__} | | {desc} |")
                    walk(inner, f"{key}[].")
                else:
                    rows.append(f"| `{key}` | section | | {desc} |")
                    walk(inner, f"{key}.")
            else:
                rows.append(f"| `{key}` | {type_name(ann)} | {default} | {desc} |")

    walk(Config, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())
