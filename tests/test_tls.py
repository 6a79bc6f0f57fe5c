"""Security: TLS with a client certificate (mTLS) and a password against a real Mosquitto; clear one-line errors
(and retries with backoff) for a wrong password, an untrusted server certificate and a missing client
certificate; secrets never in logs, events or stats; the daemon runs without root and listens on no port.

The certificates are made per test session with the `openssl` command line: a CA, a server certificate for
127.0.0.1 / localhost (subjectAltName), a client certificate, and a second, unrelated CA.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import Mosquitto, Subscriber, free_port, wait_until
from conftest import REPO, edgecv_env

pytestmark = pytest.mark.integration

NODE = "sec"
USER = "edgecv-node"
PASSWORD = "pw-Q7r2-s3cr3t"  # must never show up anywhere
CAM_PASSWORD = "cam-K9x4-s3cr3t"
NOBODY = 65534



def _tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None)
    if not found:
        pytest.fail(f"{name} is not installed (scripts/setup.sh installs it: apt install openssl mosquitto)")
    return found


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """ca.crt, server.crt/key (127.0.0.1, localhost), client.crt/key (signed by ca), other-ca.crt; passwd."""
    d = tmp_path_factory.mktemp("pki")
    days = "3"
    for ca, cn in (("ca", "edgecv test CA"), ("other-ca", "unrelated CA")):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", days, "-subj", f"/CN={cn}", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                  "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=clientAuth\n")
    for i, (name, cn) in enumerate((("server", "localhost"), ("client", USER)), start=1):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", str(i),
                 "-out", f"{name}.crt", "-days", days, "-extfile", f"{name}.ext", cwd=d)
    passwd = d / "passwd"
    passwd.write_text("")
    r = subprocess.run([_tool("mosquitto_passwd"), "-b", str(passwd), USER, PASSWORD], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for f in d.iterdir():
        f.chmod(0o600)
    return d


class TlsBroker(Mosquitto):
    """Mosquitto with one TLS listener: client certificate required, password file, no anonymous access."""

    def __init__(self, workdir: Path, pki: Path) -> None:
        super().__init__(workdir)
        user = "user root\n" if os.geteuid() == 0 else ""  # root: stay root to read the test's 0600 files
        self.conf.write_text(
            f"per_listener_settings false\nallow_anonymous false\npassword_file {pki / 'passwd'}\n{user}"
            f"persistence false\n"
            f"listener {self.port} 127.0.0.1\ncafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\n"
            f"keyfile {pki / 'server.key'}\nrequire_certificate true\n")

    def connection_attempts(self) -> int:
        """TCP connections the broker accepted (each attempt of a client, successful or not)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(r"New connection from 127\.0\.0\.1|Client connection from 127\.0\.0\.1 failed", text))


def tls_subscriber(port: int, pki: Path, topics: list[str]) -> Subscriber:
    """A broker.Subscriber connecting over mTLS with the password."""

    def configure(client: mqtt.Client) -> None:
        client.tls_set(ca_certs=str(pki / "ca.crt"), certfile=str(pki / "client.crt"),
                       keyfile=str(pki / "client.key"), cert_reqs=ssl.CERT_REQUIRED)
        client.username_pw_set(USER, PASSWORD)

    return Subscriber(port, topics, client_id="tls-subscriber", configure=configure)


def write_config(path: Path, port: int, tls: Optional[dict], *, auth: bool = True, rtsp_port: Optional[int] = None,
                 pace_fps: Optional[float] = None) -> Path:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["node_id"] = NODE
    data["mqtt"].update({"host": "127.0.0.1", "port": port, "stats_interval_s": 1})
    if auth:
        data["mqtt"].update({"username": "${MQTT_USER}", "password": "${MQTT_PASS}"})
    if tls is not None:
        data["mqtt"]["tls"] = tls
    data["console"] = {"enabled": True, "format": "json"}
    cam = data["cameras"]["street"]
    cam["realtime"] = False
    if pace_fps:
        cam["pace_fps"] = pace_fps
    if rtsp_port:  # a camera with credentials in its URL; nothing serves it, so it keeps retrying (and logging)
        data["cameras"]["door"] = {"source": f"rtsp://admin:${{CAM_PASS}}@127.0.0.1:{rtsp_port}/stream1",
                                   "open_timeout_s": 2, "reconnect": {"initial_s": 0.5, "max_s": 2}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tls_files(pki: Path, ca: str = "ca.crt", client: bool = True) -> dict:
    out = {"ca_file": str(pki / ca)}
    if client:
        out.update({"cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key")})
    return out


class Run:
    """`edgecv run` in a subprocess; stdout/stderr to files (readable while it runs)."""

    def __init__(self, tmp: Path, config: Path, env: dict, *args: str, **popen) -> None:
        self.out, self.err = tmp / "daemon.stdout", tmp / "daemon.stderr"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgecv.cli", "run", str(config), *args], env=env,
                                         stdout=out, stderr=err, **popen)

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def sockets_of(pid: int) -> list[tuple[str, str, str, str]]:
    """(protocol, local address, remote address, TCP state) of every inet socket the process has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                found.append((proto, f[1], f[2], f[3]))
    return found


def assert_listens_on_nothing(pid: int) -> list[tuple[str, str, str, str]]:
    socks = sockets_of(pid)
    listening = [s for s in socks if s[0].startswith("udp") or s[3] == "0A"]  # 0A: TCP LISTEN
    assert not listening, f"the daemon must not bind a port: {listening}"
    assert any(s[0].startswith("tcp") and s[3] == "01" for s in socks), f"no broker connection seen: {socks}"
    return socks


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and CAM_PASSWORD not in text, "a secret leaked"


# ---------------------------------------------------------------------------------------------------------


def test_mtls_with_password_delivers_events_and_never_shows_a_secret(assets, pki, tmp_path):
    broker = TlsBroker(tmp_path, pki).start()
    run = None
    try:
        sub = tls_subscriber(broker.port, pki, ["#"])
        cfg = write_config(tmp_path / "tls.yaml", broker.port, tls_files(pki), rtsp_port=free_port())
        env = edgecv_env(assets, tmp_path, MQTT_USER=USER, MQTT_PASS=PASSWORD, CAM_PASS=CAM_PASSWORD)
        run = Run(tmp_path, cfg, env, "--fast")
        events = f"edgecv/{NODE}/street/events"
        assert wait_until(lambda: sum(m.topic == events for m in sub.snapshot()) >= 20
                          and any(m.topic.endswith("/stats") for m in sub.snapshot())
                          and "admin:***@" in run.stderr(), 120), run.stderr()[-3000:]
        socks = assert_listens_on_nothing(run.proc.pid)
        assert run.terminate() == 0, run.stderr()[-3000:]
        assert wait_until(lambda: any(m.payload == b"offline" for m in sub.snapshot()), 10)
        sub.close()
        out, err = run.stdout(), run.stderr()
        assert f"mqtt: connected to 127.0.0.1:{broker.port}" in err
        assert "Traceback" not in err
        printed = {json.loads(ln)["id"] for ln in out.splitlines() if ln.startswith("{")}
        received = [m for m in sub.snapshot() if m.topic == events]
        assert {m.json()["id"] for m in received} == printed, "every event printed arrived over mTLS"
        assert_no_secret(out, err, *(m.topic + m.payload.decode(errors="replace") for m in sub.snapshot()))
        assert "admin:***@127.0.0.1" in err, "the camera URL is logged, redacted"
        print(f"\nmTLS: {len(received)} events received; daemon sockets: {socks}")
    finally:
        if run is not None:
            run.kill()
        broker.stop()


@pytest.mark.parametrize("case, expected", [
    ("wrong password", r"mqtt: broker 127\.0\.0\.1:\d+ refused the connection: (Not authorized|Bad user name or "
                       r"password) \(check mqtt\.username and mqtt\.password\); retrying with backoff"),
    ("untrusted server certificate", r"mqtt: TLS connection to broker 127\.0\.0\.1:\d+ failed: the broker's "
                                     r"certificate was rejected: .+ \(check mqtt\.tls\.ca_file.*\); retrying"),
    ("no client certificate", r"mqtt: broker 127\.0\.0\.1:\d+ closed the connection before accepting it: .*"
                              r"certificate.*; retrying with backoff"),
])
def test_connection_refusals_are_one_clear_line_and_retried_with_backoff(assets, pki, tmp_path, case, expected):
    broker = TlsBroker(tmp_path, pki).start()
    run = None
    try:
        tls = tls_files(pki, ca="other-ca.crt" if case == "untrusted server certificate" else "ca.crt",
                        client=case != "no client certificate")
        password = "not-the-password" if case == "wrong password" else PASSWORD
        cfg = write_config(tmp_path / "bad.yaml", broker.port, tls, pace_fps=10)  # 80 s: it keeps running
        env = edgecv_env(assets, tmp_path, MQTT_USER=USER, MQTT_PASS=password)
        run = Run(tmp_path, cfg, env)
        # backoff 1 s, 2 s, ...: a first attempt and two retries within a few seconds
        assert wait_until(lambda: broker.connection_attempts() >= 3 or run.proc.poll() is not None, 60), \
            broker.log.read_text()[-2000:]
        assert run.proc.poll() is None, run.stderr()[-3000:]
        assert wait_until(lambda: '"id"' in run.stdout(), 60), "the cameras keep working meanwhile"
        t0 = time.monotonic()
        assert run.terminate() == 0, run.stderr()[-3000:]
        stop_s = time.monotonic() - t0
        err = run.stderr()
        mqtt_lines = [ln for ln in err.splitlines() if "edgecv.mqtt:" in ln]
        matching = [ln for ln in mqtt_lines if re.search(expected, ln)]
        assert len(matching) == 1, f"one line however many retries: {mqtt_lines}"
        assert len(mqtt_lines) == 2 and "not delivered yet; kept in the spool" in mqtt_lines[-1], mqtt_lines
        assert "Traceback" not in err and "connected to" not in err
        assert_no_secret(run.stdout(), err)
        assert "not-the-password" not in err
        assert stop_s < 10
        print(f"\n{case}: {broker.connection_attempts()} attempts, SIGTERM exit in {stop_s:.1f} s: "
              f"{matching[0].split('edgecv.mqtt: ')[-1]}")
    finally:
        if run is not None:
            run.kill()
        broker.stop()


def unprivileged_launch() -> tuple[list[str], dict, str]:
    """How to start the daemon without privileges: (command prefix, Popen arguments, description).

    Not root: as is. Root: as `nobody` when that user can run this Python (a system or repository venv), else
    (an interpreter in root's private home, as on some CI images) as uid 0 with every capability removed
    (`setpriv`: empty bounding set, no new privileges), which is what "needs no root" means to the kernel.
    """
    if os.geteuid() != 0:
        return [], {}, f"uid {os.geteuid()}"
    as_nobody = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    try:
        probe = subprocess.run([sys.executable, "-c", "import edgecv.daemon"], capture_output=True, timeout=120,
                               cwd="/", **as_nobody)
        if probe.returncode == 0:
            return [], as_nobody, "uid 65534 (nobody)"
    except OSError:
        pass
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.fail("running as root, and neither `nobody` can run this Python nor setpriv (util-linux) is there")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"], {}, \
        "uid 0 without any capability"


def test_daemon_runs_without_privileges_and_listens_on_no_port(assets, broker, tmp_path):
    prefix, popen, how = unprivileged_launch()
    home = tmp_path
    if popen:  # as nobody: a folder it owns (tmp_path's parents are private to root)
        home = Path(tempfile.mkdtemp(prefix="edgecv-unprivileged-"))
        os.chown(home, NOBODY, NOBODY)
    proc = None
    try:
        cfg = write_config(home / "plain.yaml", broker.port, None, auth=False)
        env = edgecv_env(assets, home, HOME=str(home))
        sub = Subscriber(broker.port, [f"edgecv/{NODE}/#"])
        out, err = home / "daemon.stdout", home / "daemon.stderr"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([*prefix, sys.executable, "-m", "edgecv.cli", "run", str(cfg), "--fast",
                                     "--max-frames", "300"], env=env, stdout=o, stderr=e, cwd=str(home), **popen)
        assert wait_until(lambda: any(m.topic.endswith("/events") for m in sub.snapshot())
                          or proc.poll() is not None, 120), err.read_text()[-3000:]
        assert proc.poll() is None, err.read_text()[-3000:]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        cap_eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)
        assert cap_eff == 0, "the daemon must run with no capability at all"
        assert uid != 0 or how.startswith("uid 0 without")
        socks = assert_listens_on_nothing(proc.pid)
        assert proc.wait(180) == 0, err.read_text()[-3000:]
        assert "Traceback" not in err.read_text()
        assert (home / "state" / f"{NODE}.spool.sqlite").exists()
        assert wait_until(lambda: any(m.payload == b"offline" for m in sub.snapshot()), 10)
        assert sum(m.topic.endswith("/events") for m in sub.snapshot()) >= 1
        sub.close()
        print(f"\nunprivileged: {how}, CapEff 0; sockets {socks}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if home != tmp_path:
            shutil.rmtree(home, ignore_errors=True)
