"""Config loading and validation: malformed configs through the real CLI, the example configs,
``${ENV}`` interpolation, and property tests of `parse`."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecv.config import Config, ConfigError, load, parse

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# A valid config; each malformed case below changes one thing in it.
BASE: dict[str, Any] = {
    "node_id": "test-node",
    "mqtt": {"host": "localhost", "port": 1883, "qos": 1, "topic_prefix": "edgecv"},
    "model": {"path": "models/yolox_nano.onnx", "family": "yolox", "conf": 0.35, "iou": 0.5, "classes": ["person"]},
    "tracker": {"track_thresh": 0.5, "low_thresh": 0.1},
    "cameras": {
        "street": {
            "source": "media/vtest.avi",
            "reconnect": {"initial_s": 0.5, "max_s": 30},
            "zones": {"plaza": {"polygon": [[440, 190], [680, 190], [740, 330]], "classes": ["person"]}},
            "lines": {"crossing": {"points": [[300, 150], [300, 420]]}},
        }
    },
}

SECRET = "hunter2-s3cret-987654321"
FIELD_LINE = re.compile(r"^[A-Za-z_][\w\\-]*(?:\.[\w\\-]+|\[\d+\])*: \S")  # a\nb: a key's escaped newline
FILE = "{file}"  # stands for the config file's path in the expected-path column


def edit(fn: Callable[[dict[str, Any]], None]) -> str:
    data = copy.deepcopy(BASE)
    fn(data)
    return yaml.safe_dump(data, sort_keys=False)


def cam(d: dict[str, Any]) -> dict[str, Any]:
    return d["cameras"]["street"]


@dataclass
class Case:
    id: str
    content: Optional[str]  # YAML text written to the file; None: the file is not created
    path: str  # field path (or {file}) expected at the start of a problem line
    substring: str  # expected in that same line
    env: dict[str, str] = field(default_factory=dict)
    not_in_output: tuple[str, ...] = ()
    cli: bool = True  # also run through the CLI in a subprocess (every case runs through `load` in-process)
    needs_model: bool = False  # only found by checking class names against the model (CLI check only)

    def write(self, p: Path) -> None:
        if self.content is not None:
            p.write_bytes(self.content.encode("utf-8", "surrogateescape"))


def _setitem(*keys: Union[str, int], value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return fn


def _delitem(*keys: str) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        node = d
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return fn


def _line_of(text: str, start: str) -> int:
    """1-based number of the first line of ``text`` that starts (after indentation) with ``start``."""
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith(start))


DUP_TOP = edit(lambda d: None) + "cameras: {}\n"  # a second `cameras:` would silently drop every camera
DUP_ZONE = edit(lambda d: None).replace("      plaza:", "      plaza:\n        min_frames: 2\n        min_frames: 3", 1)

C = ("cameras", "street")
Z = (*C, "zones", "plaza")
L = (*C, "lines", "crossing")
BAD_CONFIGS = [
    # run through the CLI (and through `load`)
    Case("yaml-syntax", "node_id: demo\nmqtt: {host: localhost\nmodel: x\n", FILE + ":3:6", "invalid YAML"),
    Case("empty-file", "", FILE, "config file is empty"),
    Case("top-level-list", "- node_id: demo\n- cameras: {}\n", FILE,
         "expected a mapping of settings at the top level, got list"),
    Case("no-such-file", None, FILE, "config file not found"),
    Case("conf-string", edit(_setitem("model", "conf", value="high")), "model.conf", "valid number"),
    Case("port-string", edit(_setitem("mqtt", "port", value="eighty")), "mqtt.port", "valid integer"),
    Case("unknown-top-key", edit(_setitem("trackr", value={"low_thresh": 0.1})), "trackr",
         "unknown key (did you mean 'tracker'?)"),
    Case("unknown-camera-key", edit(_setitem(*C, "zone", value={"door": {}})), "cameras.street.zone",
         "unknown key (did you mean 'zones'?)"),
    Case("unknown-zone-key", edit(_setitem(*Z, "loiter", value=5)), "cameras.street.zones.plaza.loiter",
         "unknown key (did you mean 'loiter_s'?)"),
    Case("polygon-2-points", edit(_setitem(*Z, "polygon", value=[[0, 0], [10, 10]])),
         "cameras.street.zones.plaza.polygon", "needs at least 3 points, got 2"),
    Case("line-1-point", edit(_setitem(*L, "points", value=[[0, 0]])),
         "cameras.street.lines.crossing.points", "needs exactly 2 points, got 1"),
    Case("line-3-points", edit(_setitem(*L, "points", value=[[0, 0], [1, 1], [2, 2]])),
         "cameras.street.lines.crossing.points", "needs exactly 2 points, got 3"),
    Case("line-same-points", edit(_setitem(*L, "points", value=[[5, 5], [5, 5]])),
         "cameras.street.lines.crossing.points", "the two points must be at least 1 px apart, got 0 px"),
    Case("conf-negative", edit(_setitem("model", "conf", value=-0.1)), "model.conf",
         "greater than or equal to 0 (got -0.1)"),
    Case("iou-above-1", edit(_setitem("model", "iou", value=1.5)), "model.iou", "less than or equal to 1 (got 1.5)"),
    Case("missing-model-file", edit(_setitem("model", "path", value="models/no_such_model.onnx")), "model.path",
         "file not found: models/no_such_model.onnx"),
    Case("missing-video-file", edit(_setitem(*C, "source", value="media/no_such_clip.mp4")), "cameras.street.source",
         "file not found: media/no_such_clip.mp4"),
    Case("unset-env-password", edit(_setitem("mqtt", "password", value="${EDGECV_TEST_UNSET_PASSWORD}")),
         "mqtt.password", "environment variable EDGECV_TEST_UNSET_PASSWORD is not set"),
    Case("password-wrong-type", edit(_setitem("mqtt", "password", value=987654321)), "mqtt.password",
         "valid string", not_in_output=("987654321",)),
    Case("camera-name", edit(lambda d: d["cameras"].update({"front door": d["cameras"]["street"]})), "cameras",
         "camera name 'front door' may only use letters, digits"),
    Case("reconnect-order", edit(_setitem(*C, "reconnect", value={"initial_s": 10, "max_s": 2})),
         "cameras.street.reconnect", "max_s (2) must be >= initial_s (10)"),
    Case("tracker-thresholds", edit(_setitem("tracker", value={"track_thresh": 0.4, "low_thresh": 0.6})), "tracker",
         "low_thresh (0.6) must be <= track_thresh (0.4)"),
    Case("qos-3", edit(_setitem("mqtt", "qos", value=3)), "mqtt.qos", "less than or equal to 2 (got 3)"),
    Case("topic-prefix-hash", edit(_setitem("mqtt", "topic_prefix", value="edgecv/#")), "mqtt.topic_prefix",
         "must not contain + or #"),
    Case("unknown-class-in-zone", edit(_setitem(*Z, "classes", value=["person", "unicorn"])),
         "cameras.street.zones.plaza.classes", "unknown class 'unicorn'", needs_model=True),
    Case("bad-anchor", edit(_setitem(*Z, "anchor", value="middle")), "cameras.street.zones.plaza.anchor",
         "'bottom_center'"),
    Case("missing-node-id", edit(_delitem("node_id")), "node_id", "required field is missing"),
    Case("missing-cameras", edit(_delitem("cameras")), "cameras", "required field is missing"),
    Case("cert-without-key", edit(_setitem("mqtt", "tls", value={"cert_file": "/etc/hostname"})), "mqtt.tls",
         "cert_file and key_file go together"),
    Case("newline-in-key", edit(_setitem("mqtt", "ho\nst", value="x")), "mqtt.ho\\nst",
         "unknown key (did you mean 'host'?)"),
    Case("path-too-long", edit(_setitem("model", "path", value="m" * 300 + ".onnx")), "model.path", "file not found"),
    # only through `load` (in-process, fast)
    Case("yaml-tab", "node_id: demo\n\tmodel: x\n", FILE + ":2:1", "invalid YAML", cli=False),
    Case("comments-only", "# nothing here\n", FILE, "config file is empty", cli=False),
    Case("top-level-scalar", "just a string\n", FILE, "expected a mapping of settings at the top level, got str",
         cli=False),
    Case("not-utf8", "node_id: caf\udce9\n", FILE, "cannot read config file", cli=False),
    Case("unknown-key-no-hint", edit(_setitem("mqtt", "zzzzzz", value=1)), "mqtt.zzzzzz", "unknown key (valid keys: ",
         cli=False),
    Case("polygon-nan", edit(_setitem(*Z, "polygon", value=[[0, 0], [10, float("nan")], [5, 5]])),
         "cameras.street.zones.plaza.polygon[1][1]", "Input should be a finite number (got nan)", cli=False),
    Case("line-infinite", edit(_setitem(*L, "points", value=[[0, 0], [float("inf"), 5]])),
         "cameras.street.lines.crossing.points[1][0]", "Input should be a finite number (got inf)", cli=False),
    Case("source-boolean", edit(_setitem(*C, "source", value=True)), "cameras.street.source",
         "expected a file path, URL, GStreamer pipeline or device index, got True", cli=False),
    Case("source-negative-index", edit(_setitem(*C, "source", value=-1)), "cameras.street.source",
         "device index must be between 0 and 1023, got -1", cli=False),
    Case("polygon-negative", edit(_setitem(*Z, "polygon", value=[[0, 0], [10, -1], [5, 5]])),
         "cameras.street.zones.plaza.polygon", "coordinates must be >= 0", cli=False),
    Case("point-not-a-pair", edit(_setitem(*L, "points", value=[[0, 0], [1, 2, 3]])),
         "cameras.street.lines.crossing.points[1]", "at most 2 items", cli=False),
    Case("unset-env-in-source", edit(_setitem(*C, "source", value="rtsp://${EDGECV_TEST_UNSET_CAM}@h/s")),
         "cameras.street.source", "environment variable EDGECV_TEST_UNSET_CAM is not set", cli=False),
    Case("password-list", edit(_setitem("mqtt", "password", value=[SECRET])), "mqtt.password", "valid string",
         not_in_output=(SECRET,), cli=False),
    Case("username-mapping", edit(_setitem("mqtt", "username", value={"name": SECRET})), "mqtt.username",
         "valid string", not_in_output=(SECRET,), cli=False),
    Case("zone-name", edit(_setitem(*C, "zones", "a/b", value={"polygon": [[0, 0], [10, 0], [10, 10]]})), "cameras",
         "name 'a/b' may only use letters, digits", cli=False),
    Case("unknown-class-in-model", edit(_setitem("model", "classes", value=["persn"])), "model.classes",
         "unknown class 'persn'", cli=False, needs_model=True),
    Case("bad-node-id", edit(_setitem("node_id", value="gate 01")), "node_id", "should match pattern", cli=False),
    Case("empty-cameras", edit(_setitem("cameras", value={})), "cameras", "at least 1 item", cli=False),
    Case("loiter-zero", edit(_setitem(*Z, "loiter_s", value=0)), "cameras.street.zones.plaza.loiter_s",
         "greater than 0", cli=False),
    Case("base-dir-is-not-a-key", edit(_setitem("base_dir", value="/")), "base_dir", "unknown key", cli=False),
    # hostile or absurd values that pass a naive check and break at run time (issue 8)
    Case("alias-bomb", "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                               for p, k in zip(["", *"abcdefgh"], "abcdefghi")),
         FILE, "invalid YAML: more than 100,000 values once its aliases are expanded"),
    Case("alias-cycle", "a: &a [*a]\n", FILE, "invalid YAML: an alias refers to a node that contains it"),
    Case("integer-of-5000-digits", "node_id: x\nmqtt: {port: " + "9" * 5000 + "}\n", FILE,
         "invalid YAML: a value cannot be read: Exceeds the limit (4300 digits)"),
    Case("python-tag", "node_id: !!python/object:os.system x\n", FILE + ":1:10",
         "invalid YAML: could not determine a constructor for the tag"),
    Case("nested-too-deep", "a: " + "[" * 3000 + "]" * 3000 + "\n", FILE, "nested more than 64 levels deep"),
    Case("duplicate-key", DUP_TOP, FILE + f":{_line_of(DUP_TOP, 'cameras: {}')}:1",
         f"invalid YAML: duplicate key 'cameras' (first at line {_line_of(DUP_TOP, 'cameras:')})"),
    Case("duplicate-zone-setting", DUP_ZONE, FILE + f":{_line_of(DUP_ZONE, 'min_frames: 3')}:9",
         f"invalid YAML: duplicate key 'min_frames' (first at line {_line_of(DUP_ZONE, 'min_frames: 2')})"),
    Case("config-too-large", "node_id: x\n" + "# padding\n" * 120_000, FILE, "config file is larger than 1024 KiB"),
    Case("polygon-too-many-vertices", edit(_setitem(*Z, "polygon", value=[[i % 1000, i // 1000 * 5 + (i % 2)]
                                                                           for i in range(1001)])),
         "cameras.street.zones.plaza.polygon", "has 1001 points, at most 1000 are allowed"),
    Case("polygon-collinear", edit(_setitem(*Z, "polygon", value=[[0, 0], [10, 10], [20, 20]])),
         "cameras.street.zones.plaza.polygon", "encloses no area"),
    Case("polygon-huge-coordinate", edit(_setitem(*Z, "polygon", value=[[0, 0], [2 ** 31, 0], [5, 5]])),
         "cameras.street.zones.plaza.polygon", "coordinates must be <= 100000"),
    Case("line-points-1e-10-apart", edit(_setitem(*L, "points", value=[[5, 5], [5, 5 + 1e-10]])),
         "cameras.street.lines.crossing.points", "at least 1 px apart"),
    Case("line-1e308", edit(_setitem(*L, "points", value=[[0, 0], [1e308, 5]])),
         "cameras.street.lines.crossing.points", "coordinates must be <= 100000"),
    Case("device-index-huge", edit(_setitem(*C, "source", value=2 ** 40)), "cameras.street.source",
         "device index must be between 0 and 1023"),
    Case("device-index-string-huge", edit(_setitem(*C, "source", value="99999999999")), "cameras.street.source",
         "device index must be between 0 and 1023"),
    Case("topic-prefix-too-long", edit(_setitem("mqtt", "topic_prefix", value="a" * 70_000)), "mqtt.topic_prefix",
         "must be at most 256 characters"),
    Case("topic-prefix-control-char", edit(_setitem("mqtt", "topic_prefix", value="edge\x07cv")),
         "mqtt.topic_prefix", "must not contain control characters"),
    Case("topic-prefix-empty-level", edit(_setitem("mqtt", "topic_prefix", value="edge//cv")), "mqtt.topic_prefix",
         "an empty level"),
    Case("conf-nan", edit(_setitem("model", "conf", value=float("nan"))), "model.conf", "finite number"),
    Case("cooldown-infinite", edit(_setitem(*Z, "cooldown_s", value=float("inf"))),
         "cameras.street.zones.plaza.cooldown_s", "finite number"),
    Case("source-is-a-folder", edit(_setitem(*C, "source", value="/tmp")), "cameras.street.source",
         "is a folder, not a file: /tmp"),
    Case("source-is-a-device", edit(_setitem(*C, "source", value="/dev/null")), "cameras.street.source",
         "is not a regular file"),
    Case("port-from-env-not-int", edit(_setitem("mqtt", "port", value="${EDGECV_TEST_PORT}")), "mqtt.port",
         "valid integer", env={"EDGECV_TEST_PORT": "http"}, cli=False),
]


def _env(assets: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGECV_TEST_", "MQTT_", "CAM_"))}
    env.update({"EDGECV_ASSETS": str(assets), "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra)
    return env


def check(config: Union[str, Path], assets: Path, *args: str, env: Optional[dict[str, str]] = None,
          cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgecv.cli", "check", str(config), *args], capture_output=True,
                          text=True, env=_env(assets, env or {}), cwd=cwd or REPO, timeout=120)


def test_base_config_is_valid(assets: Path, tmp_path: Path) -> None:
    """The starting point of every malformed case passes the full check (with the model)."""
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(BASE))
    r = check(p, assets, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{p}: ok (1 camera(s): street)"
    assert r.stderr == ""


@pytest.fixture(scope="module")
def bad_results(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, subprocess.CompletedProcess]]:
    """Run every malformed case through the CLI once, in parallel."""
    folder = tmp_path_factory.mktemp("bad_configs")

    def one(case: Case) -> tuple[str, tuple[str, subprocess.CompletedProcess]]:
        p = folder / f"{case.id}.yaml"
        case.write(p)
        return case.id, (str(p), check(p, assets, env=case.env, cwd=folder))

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, CLI_CASES))


CLI_CASES = [c for c in BAD_CONFIGS if c.cli]


def test_case_table_is_consistent() -> None:
    ids = [c.id for c in BAD_CONFIGS]
    assert len(ids) == len(set(ids)) and len(CLI_CASES) >= 18


def _assert_problem_lines(case: Case, config_path: str, lines: list[str]) -> None:
    assert lines, "no problem reported"
    for line in lines:
        assert line.strip() == line and line, f"blank or padded line: {line!r}"
        assert line.startswith(config_path + ":") or FIELD_LINE.match(line), f"not a problem line: {line!r}"
        assert "edgecv: error" not in line and "Traceback" not in line
    expected = case.path.replace(FILE, config_path)
    hits = [ln for ln in lines if ln.startswith(expected + ":") and case.substring in ln]
    assert hits, f"expected a line starting with {expected!r} containing {case.substring!r}; got:\n" + "\n".join(lines)
    for secret in case.not_in_output:
        assert not any(secret in ln for ln in lines)


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_malformed_config_is_reported_by_cli(case: Case, bad_results: dict) -> None:
    config_path, r = bad_results[case.id]
    out = r.stdout + r.stderr
    assert "Traceback" not in out
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stdout == ""
    assert r.stderr.endswith("\n") and "\r" not in r.stderr
    _assert_problem_lines(case, config_path, r.stderr.splitlines())
    for secret in case.not_in_output:
        assert secret not in out


@pytest.mark.parametrize("case", [c for c in BAD_CONFIGS if not c.needs_model], ids=lambda c: c.id)
def test_malformed_config_is_reported_by_load(case: Case, assets: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith(("EDGECV_TEST_", "MQTT_", "CAM_"))]:
        monkeypatch.delenv(k)
    for k, v in {"EDGECV_ASSETS": str(assets), **case.env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    p = tmp_path / f"{case.id}.yaml"
    case.write(p)
    with pytest.raises(ConfigError) as e:
        load(p)
    assert all(len(ln.splitlines()) == 1 for ln in e.value.problems)
    assert str(e.value) == "\n".join(e.value.problems)
    _assert_problem_lines(case, str(p), e.value.problems)


def test_unknown_key_hint_is_looked_up_in_the_right_section(assets: Path, tmp_path: Path) -> None:
    """A zone (or camera) whose name equals a field name must not confuse the 'did you mean' lookup."""
    def mutate(d: dict[str, Any]) -> None:
        d["cameras"]["zones"] = copy.deepcopy(d["cameras"]["street"])
        d["cameras"]["zones"]["zones"]["polygon"] = {"polygon": [[0, 0], [5, 0], [5, 5]], "anchr": "center"}
        d["cameras"]["zones"]["sorce"] = "x"
    p = tmp_path / "c.yaml"
    p.write_text(edit(mutate))
    r = check(p, assets, "--no-model", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "cameras.zones.zones.polygon.anchr: unknown key (did you mean 'anchor'?)",
        "cameras.zones.sorce: unknown key (did you mean 'source'?)",
    ]


def test_several_problems_are_all_reported(assets: Path, tmp_path: Path) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["mqtt"]["qos"] = 5
        d["model"]["conf"] = 2
        cam(d)["zones"]["plaza"]["polygon"] = [[0, 0]]
    p = tmp_path / "c.yaml"
    p.write_text(edit(mutate))
    r = check(p, assets, cwd=tmp_path)
    assert r.returncode == 2
    assert [ln.split(":")[0] for ln in r.stderr.splitlines()] == [
        "mqtt.qos", "model.conf", "cameras.street.zones.plaza.polygon"]


# ------------------------------------------------------------------------------------------------
# the example configs


def _example_env() -> dict[str, str]:
    return {"CAM_USER": "viewer", "CAM_PASS": "pa55", "MQTT_USER": "edge", "MQTT_PASS": SECRET}


EXAMPLES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_examples_are_known() -> None:
    # security.yaml names a TLS CA file that cannot exist here; every other example must pass
    assert EXAMPLES == ["demo.yaml", "driving.yaml", "jetson.yaml", "security.yaml"]


@pytest.mark.parametrize("name", [n for n in EXAMPLES if n != "security.yaml"])
def test_example_config_passes_check_without_model(name: str, assets: Path) -> None:
    r = check(CONFIGS / name, assets, "--no-model", env=_example_env())
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert re.fullmatch(rf".*{re.escape(name)}: ok \(1 camera\(s\): \w+\)\n", r.stdout)


def test_security_example_only_lacks_its_ca_file(assets: Path) -> None:
    if Path("/etc/edgecv/ca.crt").exists():
        pytest.skip("/etc/edgecv/ca.crt exists on this machine")
    r = check(CONFIGS / "security.yaml", assets, "--no-model", env=_example_env())
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == ["mqtt.tls.ca_file: file not found: /etc/edgecv/ca.crt"]
    assert SECRET not in r.stderr and "pa55" not in r.stderr


def test_security_example_names_each_unset_secret(assets: Path) -> None:
    r = check(CONFIGS / "security.yaml", assets, "--no-model")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "mqtt.username: environment variable MQTT_USER is not set",
        "mqtt.password: environment variable MQTT_PASS is not set",
        "cameras.gate.source: environment variable CAM_USER is not set",
        "cameras.gate.source: environment variable CAM_PASS is not set",
    ]


def test_demo_config_passes_full_check(assets: Path) -> None:
    r = check(CONFIGS / "demo.yaml", assets)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("demo.yaml: ok (1 camera(s): street)")


def test_demo_port_from_environment_is_validated(assets: Path) -> None:
    r = check(CONFIGS / "demo.yaml", assets, "--no-model", env={"MQTT_PORT": "not-a-port"})
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "mqtt.port: Input should be a valid integer, unable to parse string as an integer (got 'not-a-port')"]


def test_demo_loads_with_its_defaults(assets: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECV_ASSETS", str(assets))
    monkeypatch.delenv("MQTT_HOST", raising=False)
    monkeypatch.delenv("MQTT_PORT", raising=False)
    cfg = load(CONFIGS / "demo.yaml")
    assert cfg.mqtt.host == "localhost" and cfg.mqtt.port == 1883
    assert cfg.cameras["street"].kind == "file"
    assert cfg.cameras["street"].zones["plaza"].polygon[0] == (440.0, 190.0)
    assert cfg.cameras["street"].lines["crossing"].points == [(300.0, 150.0), (300.0, 420.0)]


# ------------------------------------------------------------------------------------------------
# ${ENV} interpolation


def _write(tmp_path: Path, mqtt: dict[str, Any]) -> Path:
    data = copy.deepcopy(BASE)
    data["mqtt"].update(mqtt)
    p = tmp_path / "env.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_env_variable_substitution(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECV_ASSETS", str(assets))
    monkeypatch.setenv("EDGECV_TEST_PORT", "8883")
    monkeypatch.setenv("EDGECV_TEST_HOST", "broker.example")
    monkeypatch.setenv("EDGECV_TEST_PASS", SECRET)
    cfg = load(_write(tmp_path, {"port": "${EDGECV_TEST_PORT}", "host": "mqtt.${EDGECV_TEST_HOST}",
                                 "password": "${EDGECV_TEST_PASS}"}))
    assert cfg.mqtt.port == 8883 and isinstance(cfg.mqtt.port, int)
    assert cfg.mqtt.host == "mqtt.broker.example"
    assert cfg.mqtt.password == SECRET


def test_env_variable_default(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECV_ASSETS", str(assets))
    monkeypatch.delenv("EDGECV_TEST_UNSET_PORT", raising=False)
    monkeypatch.delenv("EDGECV_TEST_UNSET_HOST", raising=False)
    p = _write(tmp_path, {"port": "${EDGECV_TEST_UNSET_PORT:-1884}", "host": "${EDGECV_TEST_UNSET_HOST:-}fallback"})
    cfg = load(p)
    assert cfg.mqtt.port == 1884 and cfg.mqtt.host == "fallback"
    monkeypatch.setenv("EDGECV_TEST_UNSET_PORT", "2000")  # a set variable wins over its default
    assert load(p).mqtt.port == 2000


def test_env_variable_unset_is_a_problem_even_in_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGECV_TEST_UNSET_CLASS", raising=False)
    data = copy.deepcopy(BASE)
    data["model"]["classes"] = ["person", "${EDGECV_TEST_UNSET_CLASS}"]
    with pytest.raises(ConfigError) as e:
        parse(data)
    assert e.value.problems == ["model.classes[1]: environment variable EDGECV_TEST_UNSET_CLASS is not set"]


def test_env_value_is_not_interpolated_twice(assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECV_ASSETS", str(assets))
    monkeypatch.setenv("EDGECV_TEST_PASS", "${HOME}")
    cfg = load(_write(tmp_path, {"password": "${EDGECV_TEST_PASS}"}))
    assert cfg.mqtt.password == "${HOME}"


# ------------------------------------------------------------------------------------------------
# property tests of parse

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)
KEYS = ["node_id", "mqtt", "model", "cameras", "tracker", "console", "log_level", "zones", "lines", "polygon",
        "points", "source", "port", "qos", "conf", "classes", "tls", "reconnect", "anchor", "password"]
keyed = st.recursive(
    json_like,
    lambda children: st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


def _assert_config_error(e: ConfigError) -> None:
    assert e.problems, "ConfigError without problems"
    for p in e.problems:
        assert isinstance(p, str) and p.strip(), f"empty problem: {p!r}"
        assert len(p.splitlines()) == 1, f"problem spans several lines: {p!r}"


def _parse_ok_or_config_error(data: Any, base_dir: Optional[Path] = None) -> None:
    try:
        cfg = parse(data, base_dir=base_dir)
    except ConfigError as e:
        _assert_config_error(e)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=json_like | keyed)
def test_parse_arbitrary_data_only_raises_config_error(data: Any) -> None:
    _parse_ok_or_config_error(data)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.dictionaries(st.integers() | st.none() | st.booleans() | st.text(max_size=5), json_like, max_size=4))
def test_parse_yaml_like_keys_only_raise_config_error(data: Any) -> None:
    """YAML allows non-string keys (1:, null:, yes:)."""
    _parse_ok_or_config_error(data)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _demo_data() -> dict[str, Any]:
    return yaml.safe_load((CONFIGS / "demo.yaml").read_text())


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parse_mutated_demo_only_raises_config_error(data: st.DataObject, assets: Path) -> None:
    tree = _demo_data()
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(tree)
        if not paths:
            break
        where = data.draw(st.sampled_from(paths), label="path")
        parent = tree
        for k in where[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["delete", "replace", "rename"]), label="op")
        key = where[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = data.draw(json_like, label="value")
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10), label="new key")] = parent.pop(key)
    _parse_ok_or_config_error(tree, base_dir=assets)


def test_parse_demo_unchanged_is_valid(assets: Path) -> None:
    cfg = parse(_demo_data(), base_dir=assets)
    assert cfg.node_id == "demo" and list(cfg.cameras) == ["street"]


@pytest.mark.parametrize("value, expected", [
    ("m" * 300 + ".onnx", "model.path: file not found: "),
    ("bad\0name.onnx", "model.path: file not found: "),
    ("two\nlines.onnx", "model.path: file not found: two\\nlines.onnx"),
])
def test_parse_odd_model_paths_are_single_line_problems(value: str, expected: str, assets: Path) -> None:
    data = _demo_data()
    data["model"]["path"] = value
    with pytest.raises(ConfigError) as e:
        parse(data, base_dir=assets)
    _assert_config_error(e.value)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(expected)
