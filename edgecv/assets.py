"""Locate (and when possible download) models and sample media.

Assets are never committed. They are looked up in, in order:
1. ``$EDGECV_ASSETS`` (a folder laid out like ``models/``, ``media/``);
2. ``../shared`` next to the repository root (development checkouts);
3. the user cache ``$XDG_CACHE_HOME/edgecv/assets`` (where ``edgecv assets --fetch`` downloads to).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .progress import Progress

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KnownAsset:
    rel: str
    sha256: Optional[str]
    url: Optional[str]
    license: str


KNOWN_ASSETS: tuple[KnownAsset, ...] = (
    KnownAsset(
        "models/yolox_nano.onnx",
        "e8af074932d4ed7e232278e3055cefcdea3edf178874a3694ae292649fb464dd",
        "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx",
        "Apache-2.0 (YOLOX, Megvii)",
    ),
    KnownAsset(
        "media/vtest.avi",
        "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        "https://raw.githubusercontent.com/opencv/opencv/4.x/samples/data/vtest.avi",
        "OpenCV sample data",
    ),
    KnownAsset(
        "models/twinlitenet.onnx",
        "f505b56bd7c9e4e38b2928373aa4daa191a9a398e07e1fb340024b9ce84d4285",
        None,
        "MIT (TwinLiteNet)",
    ),
    KnownAsset(
        "models/yolov8n_int8.onnx",
        "83de8f0d2cd521e00ae2b138c340a03dece35b060b3898509bdc69afff417312",
        None,
        "AGPL-3.0 (Ultralytics), tests only",
    ),
)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgecv" / "assets"


def asset_roots() -> list[Path]:
    """Folders searched for assets, most specific first."""
    roots: list[Path] = []
    env = os.environ.get("EDGECV_ASSETS")
    if env:
        roots.append(Path(env).expanduser())
    shared = REPO_ROOT.parent / "shared"
    if shared.is_dir():
        roots.append(shared)
    roots.append(cache_dir())
    out: list[Path] = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def resolve(path: str | os.PathLike, base_dir: Optional[Path] = None) -> Optional[Path]:
    """Find a file: absolute, relative to ``base_dir``, then under each assets root.

    Returns None when it cannot be found.
    """
    p = Path(os.path.expanduser(str(path)))
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if base_dir is not None:
            candidates.append(base_dir / p)
        candidates.append(Path.cwd() / p)
        for root in asset_roots():
            candidates.append(root / p)
            candidates.append(root / "models" / p)
            candidates.append(root / "media" / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    return None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(resp, out, label: str) -> int:
    """Copy an HTTP response into ``out``, its progress (bytes, of Content-Length when given) on stderr; the size."""
    length = resp.headers.get("Content-Length", "")
    with Progress(label, total=int(length) if length.isdigit() else None, unit="B") as progress:
        for chunk in iter(lambda: resp.read(1 << 16), b""):
            out.write(chunk)
            progress.update(len(chunk))
    return int(progress.n)


def fetch(asset: KnownAsset, dest_root: Optional[Path] = None, timeout: float = 60.0) -> Path:
    """Download a known asset into the cache, checking its hash. Raises OSError on failure."""
    if not asset.url:
        raise OSError(f"{asset.rel}: no public download address is known; copy it into {dest_root or cache_dir()}")
    dest = (dest_root or cache_dir()) / asset.rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(asset.url, timeout=timeout) as resp:
            download(resp, out, Path(asset.rel).name)
        digest = sha256_of(Path(tmp))
        if asset.sha256 and digest != asset.sha256:
            raise OSError(f"{asset.rel}: downloaded file has sha256 {digest}, expected {asset.sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
