"""TensorRT engine cache: where built engines live and what they are keyed by.

A TensorRT engine is only valid for the exact TensorRT version and GPU it was built on,
and it bakes in the precision and the largest batch. The cache key is therefore a pure
function of (ONNX file content, TensorRT version, GPU name, precision, max batch); change
any of them and the file name changes, so a stale engine is never picked up.

Files, in :func:`cache_dir` (``$EDGECV_ENGINE_CACHE``, else ``engines/cache/`` in a source
checkout, else ``~/.cache/edgecv/engines``)::

    yolox_nano-3f1c9a0b7d2e-fp16-b1-trt10.3-NVIDIA_H200.engine       the serialized engine
    yolox_nano-3f1c9a0b7d2e-fp16-b1-trt10.3-NVIDIA_H200.engine.json  sidecar: source ONNX, its
                                                                     metadata, key, build time
    yolox_nano-3f1c9a0b7d2e-int8-b8-trt10.3-NVIDIA_H200.calib        INT8 calibration cache

Nothing here imports TensorRT: the functions are plain Python so they can be tested and
used to name files anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

from edgecv import EdgecvError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
ENGINE_SUFFIXES: tuple[str, ...] = (".engine", ".plan", ".trt")
CACHE_ENV = "EDGECV_ENGINE_CACHE"
SIDECAR_SUFFIX = ".json"
CALIB_SUFFIX = ".calib"

PathLike = Union[str, os.PathLike]
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def cache_dir() -> Path:
    """The engine cache folder: ``$EDGECV_ENGINE_CACHE``, else ``engines/cache`` in a source checkout.

    An installed (non-editable) package has no ``engines/`` folder next to it; it then uses
    ``$XDG_CACHE_HOME/edgecv/engines`` (default ``~/.cache/edgecv/engines``).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    if (_REPO_ROOT / "engines").is_dir() and (_REPO_ROOT / "edgecv").is_dir():
        return _REPO_ROOT / "engines" / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecv" / "engines"


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def short_version(version: str) -> str:
    """``10.3.0.26`` -> ``10.3`` (what goes into a file name; the full version is in the hash)."""
    parts = re.findall(r"\d+", version)
    return ".".join(parts[:2]) if parts else "unknown"


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of ``text``: ``NVIDIA H200`` -> ``NVIDIA_H200``."""
    cleaned = re.sub(r"[^A-Za-z0-9.+-]+", "_", text.strip()).strip("_")
    return (cleaned or "unknown")[:limit]


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on. ``digest`` hashes all of it."""

    model: str  # ONNX file stem, for a readable name only (not hashed: renaming a file keeps its engine)
    onnx_sha256: str
    trt_version: str
    gpu_name: str
    precision: str
    max_batch: int
    calibration: str = ""  # INT8: fingerprint of the calibration images (see calibration_fingerprint)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EdgecvError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if int(self.max_batch) < 1:
            raise EdgecvError(f"max batch: expected a positive number, got {self.max_batch}")

    @property
    def digest(self) -> str:
        fields = asdict(self)
        del fields["model"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    @property
    def stem(self) -> str:
        """``yolox_nano-<hash12>-fp16-b1-trt10.3-NVIDIA_H200``."""
        return (
            f"{slug(self.model)}-{self.digest[:12]}-{self.precision}-b{int(self.max_batch)}"
            f"-trt{short_version(self.trt_version)}-{slug(self.gpu_name)}"
        )

    @property
    def filename(self) -> str:
        return self.stem + ".engine"


def engine_key(
    onnx_path: PathLike,
    trt_version: str,
    gpu_name: str,
    precision: str,
    max_batch: int,
    calibration: str = "",
    onnx_sha256: Optional[str] = None,
) -> EngineKey:
    """The key of the engine built from ``onnx_path`` (its content is hashed unless ``onnx_sha256`` is given)."""
    digest = onnx_sha256 or sha256_file(onnx_path)
    return EngineKey(Path(onnx_path).stem, digest, trt_version, gpu_name, precision, int(max_batch), calibration)


def engine_path(key: EngineKey, folder: Optional[PathLike] = None) -> Path:
    """Where the engine for ``key`` lives in the cache (``folder`` or :func:`cache_dir`)."""
    return Path(folder if folder is not None else cache_dir()) / key.filename


def sidecar_path(engine: PathLike) -> Path:
    p = Path(engine)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def calibration_cache_path(engine: PathLike) -> Path:
    """The INT8 calibration cache next to an engine: same name, ``.calib`` instead of ``.engine``."""
    p = Path(engine)
    stem = p.stem if p.suffix in ENGINE_SUFFIXES else p.name
    return p.with_name(stem + CALIB_SUFFIX)


def calibration_fingerprint(images: list[Path]) -> str:
    """A short hash of a calibration image set (names, sizes and modification times, in order)."""
    h = hashlib.sha256()
    for p in images:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def write_atomic(path: PathLike, data: Union[bytes, memoryview]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Two processes building the same engine at once both succeed; a reader never sees half a file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_sidecar(engine: PathLike, info: dict[str, Any]) -> Path:
    """Write the JSON description of an engine next to it."""
    path = sidecar_path(engine)
    write_atomic(path, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_sidecar(engine: PathLike) -> dict[str, Any]:
    """The JSON description of an engine, or {} when there is none (or it is unreadable)."""
    try:
        value = json.loads(sidecar_path(engine).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# -- ONNX metadata without the onnx package ------------------------------------------------
#
# A TensorRT machine (a Jetson, say) need not have the onnx package or onnxruntime. The
# custom metadata map is field 14 (metadata_props: repeated StringStringEntryProto with key
# = 1 and value = 2) of the top-level ModelProto, so a few lines of protobuf wire-format
# reading are enough; the graph (field 7) is skipped by its length without being parsed.

_MODEL_METADATA_FIELD = 14


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def protobuf_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) of one protobuf message; value is bytes for wire type 2.

    Value: an int for wire type 0 (varint), bytes otherwise (8 for type 1, 4 for type 5). A
    truncated or malformed message raises :class:`ValueError`. Also used to read an ONNX
    model's input shape (:func:`edgecv.engine.trt_build.onnx_input_shape`).
    """
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def onnx_metadata(path: PathLike) -> dict[str, str]:
    """The custom metadata map (``metadata_props``) of an ONNX model file; {} when it has none.

    Raises :class:`EdgecvError` when the file cannot be read or is not a protobuf message.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise EdgecvError(f"model {p}: cannot read the ONNX file: {exc.strerror or exc}") from exc
    meta: dict[str, str] = {}
    try:
        for number, wire, value in protobuf_fields(data):
            if number != _MODEL_METADATA_FIELD or wire != 2:
                continue
            key = val = ""
            for sub_number, sub_wire, sub_value in protobuf_fields(value):
                if sub_wire == 2 and sub_number == 1:
                    key = sub_value.decode("utf-8", "replace")
                elif sub_wire == 2 and sub_number == 2:
                    val = sub_value.decode("utf-8", "replace")
            meta[key] = val
    except ValueError as exc:
        raise EdgecvError(f"model {p}: expected an ONNX (protobuf) file, could not parse it: {exc}") from exc
    return meta
