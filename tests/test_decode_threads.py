"""FFmpeg's decoding threads (`cameras.<name>.decode_threads`): each thread beyond the first holds one frame back
(frame threading), so a live stream decoded on four threads hands over a frame only three packets after it
arrived. A real MPEG-4 stream (OpenCV's own encoder, in AVI, whose chunks say their size: no parser waits for the
next packet) is written packet by packet into a named pipe read as a network stream; what the source has read
once the writer pauses shows how many frames the decoder holds back. No timing is asserted: only frame counts.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import cv2
import pytest

from edgecv.config import ConfigError, parse
from edgecv.sources.base import Source
from edgecv.sources.capture import make_source

pytestmark = pytest.mark.integration

FRAMES = 12  # written before the pause


def avi_packets(assets: Path, out: Path, frames: int) -> tuple[bytes, list[bytes]]:
    """An MPEG-4 (FMP4) AVI of ``vtest.avi``'s first frames, split into its headers and one chunk per frame."""
    cap = cv2.VideoCapture(str(assets / "media" / "vtest.avi"))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"FMP4"), 10, (768, 576))
    assert writer.isOpened()
    for _ in range(frames):
        ok, image = cap.read()
        assert ok
        writer.write(image)
    writer.release()
    cap.release()
    data = out.read_bytes()
    pos = data.index(b"movi") + 4
    head, chunks = data[:pos], []
    while data[pos:pos + 4] in (b"00dc", b"JUNK"):
        size = struct.unpack("<I", data[pos + 4:pos + 8])[0]
        end = pos + 8 + size + (size & 1)
        if data[pos:pos + 4] == b"00dc":
            chunks.append(data[pos:end])
        pos = end
    assert len(chunks) == frames
    return head, chunks


def settled_reads(source: Source, timeout: float = 20.0) -> int:
    """Frames the source has read once that number stopped changing for a second."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = source.stats.read
        if now != last:
            last, since = now, time.monotonic()
        elif now > 0 and time.monotonic() - since > 1.0:
            break
        time.sleep(0.05)
    return last


@pytest.mark.parametrize("threads, held_back", [("auto", 0), (1, 0), (4, 3)])
def test_each_decoding_thread_beyond_the_first_holds_a_live_frame_back(assets: Path, tmp_path: Path,
                                                                        threads: object, held_back: int) -> None:
    head, chunks = avi_packets(assets, tmp_path / "clip.avi", FRAMES + 4)
    fifo = tmp_path / "camera.avi"
    os.mkfifo(fifo)
    cfg = parse({"node_id": "n1", "mqtt": {"enabled": False}, "console": {"enabled": False},
                 "model": {"path": str(assets / "models" / "yolox_nano.onnx")},
                 "cameras": {"pipe": {"source": str(fifo), "type": "stream", "decode_threads": threads}}})
    source = make_source("pipe", cfg.cameras["pipe"], str(fifo))
    release = threading.Event()

    def camera() -> None:
        with open(fifo, "wb", buffering=0) as pipe:
            pipe.write(head)
            for chunk in chunks[:FRAMES]:
                pipe.write(chunk)
                time.sleep(0.02)
            release.wait(30)  # the pause: the stream is open, no packet comes
            for chunk in chunks[FRAMES:]:
                pipe.write(chunk)

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    source.start()
    try:
        assert settled_reads(source) == FRAMES - held_back, f"decode_threads {threads}"
        release.set()
        writer.join(10)
    finally:
        release.set()
        source.stop()
        source.join(10)
    assert source.state != "failed", source.reason


@pytest.mark.parametrize("value", [0, 17, "many", True])
def test_a_bad_decode_threads_names_the_field(assets: Path, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"node_id": "n1", "model": {"path": str(assets / "models" / "yolox_nano.onnx")},
               "cameras": {"cam": {"source": "rtsp://camera/stream", "decode_threads": value}}})
    assert "cameras.cam.decode_threads" in str(e.value) and "auto or a number 1 to 16" in str(e.value)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_file_decoded_on_the_threads_asked_for_plays_every_frame(assets: Path, threads: int) -> None:
    clip = assets / "media" / "mot" / "TUD-Campus" / "video.mp4"
    cfg = parse({"node_id": "n1", "model": {"path": str(assets / "models" / "yolox_nano.onnx")},
                 "cameras": {"cam": {"source": str(clip), "realtime": False, "decode_threads": threads}}})
    source = make_source("cam", cfg.cameras["cam"], str(clip))
    source.start()
    taken = 0
    deadline = time.monotonic() + 30
    while not source.finished and time.monotonic() < deadline:
        if source.slot.wait(0.1) and source.slot.take() is not None:
            taken += 1
    source.join(10)
    assert taken == source.stats.read == 71 and source.reason == "end of file"
