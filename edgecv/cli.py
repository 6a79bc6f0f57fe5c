"""Command line: edgecv run | check | track | bench | assets | build-engine."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import EdgecvError, UsageError, __version__, assets, service
from .assets import resolve
from .bench import run_bench
from .capacity import RUNNERS as CAPACITY_RUNNERS
from .config import ConfigError, load
from .daemon import Signals, run, setup_logging
from .engine.backend import DYNAMIC_MAX_BATCH
from .engine.onnx_batch import dynamic_batch
from .engine.registry import calibration_detector
from .engine.trt_build import build_engine
from .evaluation.runner import (
    RunSpec,
    SequenceResult,
    evaluate,
    evaluate_suite,
    events_table,
    metrics_table,
    pooled_events,
    score_results,
    to_json,
)
from .evaluation.variants import DEFAULT_VARIANTS, PanSettings, make_variants
from .models import load_detector
from .soak import run_soak
from .sources.base import quiet_native_logs
from .track import track_video

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"edgecv: error: {message}", file=sys.stderr)
    return code


def _config_problems(problems: Sequence[str]) -> int:
    for p in problems:
        print(p, file=sys.stderr)
    return EXIT_CONFIG


def cmd_check(args: argparse.Namespace) -> int:

    try:
        cfg = load(args.config)
        if not args.no_model:
            load_detector(cfg)
    except ConfigError as e:  # model problems too: they name their field (model.path, models[1])
        return _config_problems(e.problems)
    print(f"{args.config}: ok ({len(cfg.cameras)} camera(s): {', '.join(cfg.cameras)})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:

    setup_logging("info")
    signals = Signals().install(reload=True)  # before anything else: a signal is never fatal, even now
    logging.getLogger("edgecv").info("edgecv %s starting (pid %d): %s", __version__, os.getpid(), args.config)
    if args.max_frames is not None and args.max_frames < 1:
        return _fail(f"--max-frames: expected a positive number, got {args.max_frames}", EXIT_CONFIG)
    try:
        cfg = load(args.config)
        realtime = False if args.fast else None
        return run(cfg, max_frames=args.max_frames, realtime=realtime, config_path=args.config, signals=signals)
    except ConfigError as e:
        return _config_problems(e.problems)


def _classes(text: Optional[str]) -> Optional[list[str]]:
    """--classes: comma-separated labels; given but naming none (",,") is an error, not "every class"."""
    if text is None:
        return None
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise UsageError(f"--classes: no class name given (got {text!r}); leave it out to keep every class")
    return classes


def cmd_track(args: argparse.Namespace) -> int:

    classes = _classes(args.classes)
    if args.max_frames is not None and args.max_frames < 1:
        return _fail(f"--max-frames: expected a positive number, got {args.max_frames}", EXIT_CONFIG)
    out_dir = Path(args.mot).expanduser().parent
    if not out_dir.is_dir():
        return _fail(f"--mot: folder not found: {out_dir}", EXIT_CONFIG)
    if Path(args.mot).is_dir():
        return _fail(f"--mot: is a folder, not a file: {args.mot}", EXIT_CONFIG)
    result = track_video(args.video, args.model, args.mot, family=args.family, classes=classes, conf=args.conf,
                         threads=args.threads, max_frames=args.max_frames)
    print(f"{result.frames} frames processed in {result.seconds:.2f} s: {result.fps:.1f} fps, "
          f"{result.tracks} tracks, {result.rows} rows written to {args.mot}")
    return EXIT_OK


def _eval_usage(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with `edgecv eval`'s combination of arguments, if anything."""
    if args.suite:
        return "--suite takes no VIDEO, --gt or --results" if args.video or args.gt or args.results else None
    if not args.gt:
        return "--gt GT.txt is required (or --suite DIR)"
    if args.results:
        return None
    if not args.video:
        return "VIDEO is required (or --suite DIR, or --results FILE)"
    if not (args.config or args.model):
        return "give --config CONFIG or --model MODEL (how to run the pipeline)"
    return None


def _eval_results(args: argparse.Namespace, spec: RunSpec) -> list[SequenceResult]:
    """A suite's sequences (each reported on stderr unless --json), an existing result file, or one video."""
    if args.suite:
        return evaluate_suite(args.suite, spec, on_sequence=None if args.json else (
            lambda r: print(f"  {r.name}: {r.frames} frames in {r.seconds:.1f} s", file=sys.stderr)), progress=True)
    if args.results:
        return [score_results(args.gt, args.results, args.video)]
    return [evaluate(args.video, args.gt, spec, progress=True)]


def _print_eval(results: list[SequenceResult], tolerance_s: float) -> None:
    print(metrics_table(results))
    how = f"matched within {tolerance_s:g} s, boxes overlapping"
    if len(results) == 1 and results[0].events is not None:
        print(f"\nevents of {results[0].name} ({how}):")
        print(events_table(results[0].events))
    elif pooled_events(results):
        print(f"\nevents, all sequences together ({how}):")
        print(events_table(pooled_events(results)))


def cmd_eval(args: argparse.Namespace) -> int:

    listed = _classes(args.classes)
    classes = tuple(listed) if listed else None
    spec = RunSpec(config=args.config, camera=args.camera, model=args.model, family=args.family, classes=classes,
                   conf=args.conf, threads=args.threads, tolerance_s=args.tolerance_s, rules=args.rules,
                   tracker=tuple(args.tracker or ()), detect=tuple(args.detect or ()))
    problem = _eval_usage(args)
    if problem:
        return _fail(problem, EXIT_CONFIG)
    results = _eval_results(args, spec)
    if args.json:
        print(to_json(results))
        return EXIT_OK
    _print_eval(results, args.tolerance_s)
    return EXIT_OK


def cmd_variants(args: argparse.Namespace) -> int:

    specs = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else list(DEFAULT_VARIANTS)
    settings = PanSettings(seed=args.seed)
    n = 0
    for folder in make_variants(Path(args.suite), Path(args.out), specs, settings, copy_base=not args.no_base,
                                rules=args.rules):
        n += 1
        print(folder)
    print(f"{n} sequence folders in {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what in CAPACITY_RUNNERS:  # capacity, latency
        if args.duration is None:
            args.duration = 30.0
        return CAPACITY_RUNNERS[args.what](args)
    if args.duration is None:
        args.duration = 600.0
    if args.what == "soak":

        try:
            return run_soak(args)
        except ConfigError as e:
            return _config_problems(e.problems)

    return run_bench(args)


def cmd_assets(args: argparse.Namespace) -> int:

    print("asset folders searched: " + ", ".join(str(r) for r in assets.asset_roots()))
    missing = 0
    for a in assets.KNOWN_ASSETS:
        path = assets.resolve(a.rel)
        if path is None and args.fetch and a.url:
            try:
                path = assets.fetch(a)
            except OSError as e:
                print(f"  {a.rel:28s} download failed: {e}")
        if path is None:
            missing += 1
            print(f"  {a.rel:28s} MISSING   ({a.license})")
            continue
        status = "found"
        if args.verify and a.sha256:
            status = "ok" if assets.sha256_of(path) == a.sha256 else "HASH MISMATCH"
        print(f"  {a.rel:28s} {status:9s} {path}")
    return EXIT_OK if not missing else EXIT_ERROR


def cmd_model_dynamic_batch(args: argparse.Namespace) -> int:

    model = resolve(args.model) or Path(args.model)
    video = resolve(args.video)
    output = Path(args.output)
    if video is None:
        return _fail(f"--video: file not found: {args.video}", EXIT_CONFIG)
    if not 2 <= args.batch <= DYNAMIC_MAX_BATCH:
        return _fail(f"--batch: expected 2 to {DYNAMIC_MAX_BATCH}, got {args.batch}", EXIT_CONFIG)
    if output.is_dir() or not output.parent.is_dir():
        return _fail(f"OUTPUT: {output} is a folder" if output.is_dir() else f"OUTPUT: folder not found: {output.parent}",
                     EXIT_CONFIG)
    result = dynamic_batch(model, output, video, batch=args.batch, family=args.family,
                           threads=args.threads)
    rewrite, check = result.rewrite, result.check
    state = "already dynamic" if rewrite.already_dynamic else f"fixed batch {rewrite.batch}"
    print(f"{model.name}: {state}; input {', '.join(rewrite.inputs)}")
    for change in rewrite.changes or ("nothing to rewrite in the graph",):
        print(f"  {change}")
    diffs = ", ".join(f"batch {n}: max abs diff {d:.3g}" for n, d in sorted(check.max_abs_diff.items()))
    print(f"checked with ONNX Runtime (CPU) on {check.frames} frames of {video.name}, each frame's outputs against "
          f"the original model's on that frame: {diffs}")
    print(f"wrote {result.output}")
    return EXIT_OK


def cmd_service_install(args: argparse.Namespace) -> int:
    """Write the systemd unit and print the systemctl commands to run (never runs them)."""
    if not Path(args.config).expanduser().is_file():
        return _fail(f"CONFIG: file not found: {args.config}", EXIT_CONFIG)
    try:
        path = service.install(args.config, user=args.user, output=args.output)
    except OSError as e:
        return _fail(str(e))
    print(f"wrote {path}; now run:")
    for line in service.systemctl_commands(path, args.user):
        print(f"  {line}")
    return EXIT_OK


def cmd_build_engine(args: argparse.Namespace) -> int:

    model = resolve(args.model) or Path(args.model)
    result = build_engine(model, output=args.output, precision=args.precision, max_batch=args.max_batch,
                          workspace_mb=args.workspace_mb, calib_dir=args.calib_dir, calib_batch=args.calib_batch,
                          family=args.family, adapter_factory=calibration_detector)
    print(result.path)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgecv", description="Real-time edge video analytics daemon")
    p.add_argument("--version", action="version", version=f"edgecv {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon on a config")
    r.add_argument("config")
    r.add_argument("--max-frames", type=int, default=None, help="stop after N frames per camera")
    r.add_argument("--fast", action="store_true", help="read files as fast as possible (no drops), not in real time")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check", help="validate a config (exit 0 valid, 2 invalid)")
    c.add_argument("config")
    c.add_argument("--no-model", action="store_true", help="do not load the model to check class names")
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("track", help="track objects in a video file, write MOT-challenge rows")
    t.add_argument("video")
    t.add_argument("--model", required=True)
    t.add_argument("--family", default="auto", choices=["auto", "yolox", "yolov8"])
    t.add_argument("--classes", default=None, help="comma-separated labels, e.g. person,car")
    t.add_argument("--conf", type=float, default=0.3)
    t.add_argument("--threads", type=int, default=None, help="inference threads")
    t.add_argument("--max-frames", type=int, default=None)
    t.add_argument("--mot", required=True, help="output file (frame,id,x,y,w,h,score,-1,-1,-1)")
    t.set_defaults(func=cmd_track)

    v = sub.add_parser("eval", help="score tracking (MOTA, IDF1, ...) and events against ground truth")
    v.add_argument("video", nargs="?", help="the annotated video")
    v.add_argument("--gt", help="its ground truth, MOT-challenge rows frame,id,x,y,w,h,flag,class,visibility")
    v.add_argument("--suite", help="a folder of sequence folders (video.*, gt.txt, optional config.yaml, seqinfo.ini)")
    v.add_argument("--config", help="run this config's camera on the video (zones and lines give event accuracy)")
    v.add_argument("--camera", help="with --config: the camera whose settings are used (default: the first)")
    v.add_argument("--model", help="or run this model with the settings below (no config)")
    v.add_argument("--family", default="auto", choices=["auto", "yolox", "yolov8"])
    v.add_argument("--classes", default=None, help="comma-separated labels (default: the gt's classes, e.g. person)")
    v.add_argument("--conf", type=float, default=0.3, help="detector confidence threshold (default 0.3)")
    v.add_argument("--threads", type=int, default=None, help="inference threads")
    v.add_argument("--rules", help="with --model: a YAML file of `zones` and `lines` (as in a camera section) whose "
                   "events are scored (a sequence folder's rules.yaml is used the same way)")
    v.add_argument("--tracker", action="append", metavar="KEY=VALUE",
                   help="a tracker setting for this run, e.g. --tracker motion_compensation=off (repeatable)")
    v.add_argument("--detect", action="append", metavar="KEY=VALUE",
                   help="a setting of the camera's detect section for this run, e.g. --detect every_n=2 or "
                        "--detect motion_gate.enabled=true (repeatable)")
    v.add_argument("--results", help="score this MOT result file instead of running the pipeline")
    v.add_argument("--tolerance-s", type=float, default=1.0,
                   help="events: largest time between a found and a true event that still match (default 1 s)")
    v.add_argument("--json", action="store_true", help="print JSON instead of tables")
    v.set_defaults(func=cmd_eval)

    va = sub.add_parser("variants", help="make moving-camera, low-fps and half-size variants of annotated sequences")
    va.add_argument("suite", help="folder of sequence folders (video.*, gt.txt, optional seqinfo.ini)")
    va.add_argument("out", help="folder to write the sequences (copies) and their variants to")
    va.add_argument("--variants", default=None,
                    help="comma-separated, e.g. pan,shake,drop2,half,pan+drop2 (default: a set of eight)")
    va.add_argument("--seed", type=int, default=0, help="seed of the camera paths (default 0)")
    va.add_argument("--no-base", action="store_true", help="do not copy the original sequences")
    va.add_argument("--rules", action="store_true",
                    help="also write a rules.yaml per sequence (two counting lines and a zone, placed by frame size) "
                         "so that edgecv eval --suite scores event accuracy")
    va.set_defaults(func=cmd_variants)

    b = sub.add_parser("bench", help="benchmarks, printed as a table")
    b.add_argument("what", choices=["model", "track", "tracker", "trackers", "all", "soak", "driving", "capacity",
                                    "latency", "batch"])
    b.add_argument("config", nargs="?", help="soak: the daemon config to run (file cameras are looped); "
                   "driving: its config (default: built in, the models and rules of configs/driving.yaml); trackers: a config to run instead of --model")
    b.add_argument("--model", default="models/yolox_nano.onnx")
    b.add_argument("--video", default="media/vtest.avi")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--parallel", type=int, default=None,
                   help="capacity, latency: frames inferred at the same time (model.parallel; default auto)")
    b.add_argument("--frames", type=int, default=300, help="frames to run (batch: per batch size, at most 64)")
    b.add_argument("--batches", default="1,2,4,8", help="batch: batch sizes to time (default 1,2,4,8)")
    b.add_argument("--duration", type=float, default=None, help="soak: seconds to run (default 600); capacity, "
                   "latency: seconds measured per run, after the warm-up (default 30)")
    b.add_argument("--interval", type=float, default=10.0, help="soak: seconds between samples (default 10)")
    b.add_argument("--warmup", type=float, default=None,
                   help="soak: seconds before the growth baseline (default a quarter of --duration, at most 120); "
                   "capacity, latency: seconds before the measured window (default a quarter of --duration, 2 to 10)")
    b.add_argument("--out", default=None, help="soak: also write the samples to this CSV file")
    b.add_argument("--suite", default=None, help="trackers: folder of annotated sequences (as for edgecv eval --suite)")
    b.add_argument("--classes", default=None, help="trackers: labels tracked (default: the gt's classes)")
    b.add_argument("--conf", type=float, default=0.3, help="trackers: detector confidence threshold (default 0.3)")
    b.add_argument("--tracker", action="append", metavar="KEY=VALUE",
                   help="trackers: an edgecv tracker setting for this run (repeatable)")
    b.add_argument("--peers", default="bytetrack,ocsort,botsort,cbiou,mcbyte",
                   help="trackers: peer trackers of roboflow trackers to run (default: all five)")
    b.add_argument("--peers-python", default=None,
                   help="trackers: a Python with roboflow trackers installed (default .venv-peers/bin/python, "
                        "made by scripts/peers.sh, or $EDGECV_PEERS_PYTHON)")
    b.add_argument("--max-rss-mb", type=float, default=50.0, help="soak: allowed RSS growth in MB (default 50)")
    b.add_argument("--max-threads", type=int, default=2, help="soak: allowed thread-count growth (default 2)")
    b.add_argument("--max-fds", type=int, default=10, help="soak: allowed open-fd growth (default 10)")
    b.add_argument("--cameras", default="4,8,12,16", help="capacity: camera counts to run (default 4,8,12,16)")
    b.add_argument("--fps", type=float, default=10.0,
                   help="capacity, latency: each camera's frame rate (default 10; at most the video's own)")
    b.add_argument("--every-n", type=int, default=None,
                   help="capacity: run the detector on every n-th frame (cameras.<n>.detect.every_n)")
    b.add_argument("--no-defer", action="store_true",
                   help="capacity: with --every-n, never defer a due frame while the detector is busy "
                        "(cameras.<n>.detect.defer_when_busy: false)")
    b.add_argument("--motion-gate", action="store_true",
                   help="capacity: skip the detector on still frames (cameras.<n>.detect.motion_gate.enabled)")
    b.set_defaults(func=cmd_bench)

    a = sub.add_parser("assets", help="locate (and fetch) models and sample media")
    a.add_argument("--fetch", action="store_true", help="download missing known assets into the cache")
    a.add_argument("--verify", action="store_true", help="check sha256 of each found asset")
    a.set_defaults(func=cmd_assets)

    e = sub.add_parser("build-engine", help="build a TensorRT engine from an ONNX model (into the engine cache)")
    e.add_argument("model", help="ONNX model (also looked up in the assets folders)")
    e.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    e.add_argument("--calib-dir", default=None, help="int8: folder of calibration images like the model will see")
    e.add_argument("--calib-batch", type=int, default=8, help="int8: images per calibration batch (default 8)")
    e.add_argument("--max-batch", type=int, default=1, help="largest batch (models with a dynamic batch; default 1)")
    e.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT builder workspace (default 1024)")
    e.add_argument("--family", default="auto", help="int8: model family whose preprocessing calibration uses")
    e.add_argument("--output", default=None,
                   help="engine file (default: the engine cache, engines/cache or $EDGECV_ENGINE_CACHE)")
    e.set_defaults(func=cmd_build_engine)

    sv = sub.add_parser("service", help="systemd: write the unit that runs the daemon (service install)")
    svsub = sv.add_subparsers(dest="service_command", required=True)
    si = svsub.add_parser("install", help="write a hardened Type=notify unit for CONFIG and print the systemctl "
                          "commands to run (it runs none)")
    si.add_argument("config", help="the daemon's config (its absolute path goes into ExecStart)")
    si.add_argument("--user", action="store_true", help="a user unit (~/.config/systemd/user; no User=, "
                    "no options only a system manager applies)")
    si.add_argument("--output", default=None, help="write the unit here instead (a file, or a folder for "
                    "edgecv.service)")
    si.set_defaults(func=cmd_service_install)

    mo = sub.add_parser("model", help="model tools (dynamic-batch)")
    msub = mo.add_subparsers(dest="model_command", required=True)
    db = msub.add_parser("dynamic-batch", help="rewrite a fixed-batch ONNX model to a dynamic batch dimension, "
                         "checked on real frames (needs edgecv[tools])")
    db.add_argument("model", help="ONNX model (also looked up in the assets folders)")
    db.add_argument("output", help="the rewritten model (written only when the check passes)")
    db.add_argument("--video", default="media/vtest.avi", help="frames of the check (default media/vtest.avi)")
    db.add_argument("--batch", type=int, default=4, help="frames stacked in the check's batch (default 4)")
    db.add_argument("--family", default="auto", help="model family whose preprocessing makes the check's inputs")
    db.add_argument("--threads", type=int, default=None, help="inference threads of the check")
    db.set_defaults(func=cmd_model_dynamic_batch)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack (diagnosing a stuck daemon)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = build_parser().parse_args(argv)

    # every command logs in one format, warnings (NumPy's RuntimeWarning, EdgecvWarning) included, one line
    # each: no raw, multi-line stderr; `run` sets the config's level once the config is read
    setup_logging("warning")
    quiet_native_logs()  # FFmpeg's and OpenCV's own messages: fatal only, before any capture opens
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        return _fail(str(e), EXIT_CONFIG)
    except EdgecvError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # last resort: one line, the traceback only at debug level
        logging.getLogger("edgecv").debug("unexpected error", exc_info=True)
        return _fail(f"unexpected {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
