"""`make mlflow` / `make airflow` launchers (python -m pipelines.services): every listening socket of every
component is on 127.0.0.1 (the task-log servers included), and SIGTERM / Ctrl-C (SIGINT) to the launcher stops
every process it started, nothing left re-parented to init. Real servers, real signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipelines.services import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tree(pid: int) -> list[psutil.Process]:
    """The launcher and every process in the sessions it started (its children lead their own sessions)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    sessions = {os.getsid(p.pid) for p in procs if p.is_running()} - {os.getsid(0)}   # never the test's own
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) in sessions and p not in procs:
                procs.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return procs


def _listening(procs: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((p.pid, " ".join(p.cmdline()[:6]), c.laddr.ip, c.laddr.port))
        except psutil.Error:
            pass
    return out


def _wait_url(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"launcher exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def _stop_and_check(proc: subprocess.Popen, procs: list[psutil.Process], sig: int) -> None:
    os.killpg(proc.pid, sig)             # what Ctrl-C in the terminal / a supervisor's SIGTERM delivers
    proc.wait(timeout=90)
    assert proc.returncode == 0
    _, alive = psutil.wait_procs([p for p in procs if p.pid != proc.pid], timeout=30)
    left = [(p.pid, p.cmdline()[:4]) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:                                              # clean up before failing
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not left, f"left running after {signal.Signals(sig).name}: {left}"


def _cleanup(proc: subprocess.Popen) -> None:
    """After a failure: the launcher's own SIGTERM cleanup, then SIGKILL to anything of its tree left."""
    if proc.poll() is not None:
        return
    procs = _tree(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def _launch(kind: str, port: int, root: Path, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipelines.services", kind, "--port", str(port), "--root",
                             str(root)], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True,     # as `make` runs it from a terminal: its own group
                            preexec_fn=_terminal_sigint)


def _terminal_sigint():
    """SIGINT at its default, as in a terminal: a test run started in the background (`cmd &`, nohup) inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler in the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_mlflow_launcher_stops_its_server_on_signal(tmp_path, sig):
    port = free_port()
    log = tmp_path / "launcher.log"
    proc = _launch("mlflow", port, tmp_path / "mlflow", log)
    try:
        _wait_url(f"http://127.0.0.1:{port}/health", proc, log, 180)
        procs = _tree(proc.pid)
        assert len(procs) >= 2
        socks = _listening(procs)
        assert socks and all(ip == "127.0.0.1" for _, _, ip, _ in socks), socks
        _stop_and_check(proc, procs, sig)
    finally:
        _cleanup(proc)


def test_airflow_components_listen_on_loopback_only_and_stop_on_sigterm(tmp_path):
    port, logs_port, trigger_logs_port = free_port(), free_port(), free_port()   # 8793/8794 under `make airflow`
    log = tmp_path / "launcher.log"
    proc = _launch("airflow", port, tmp_path / "airflow_home", log,
                   {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(logs_port),
                    "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(trigger_logs_port)})
    try:
        _wait_url(f"http://127.0.0.1:{port}/api/v2/monitor/health", proc, log, 300)
        deadline = time.monotonic() + 120          # every component up, the two log servers listening
        while True:
            procs = _tree(proc.pid)
            socks = _listening(procs)
            ports = {p for *_, p in socks}
            if {port, logs_port, trigger_logs_port} <= ports or time.monotonic() > deadline:
                break
            time.sleep(2)
        names = " ".join(c for _, c, _, _ in socks)
        assert {port, logs_port, trigger_logs_port} <= ports, socks            # api-server and both task-log servers
        assert "serve-logs" in names
        wild = [s for s in socks if s[2] != "127.0.0.1"]
        assert not wild, f"listening beyond 127.0.0.1: {wild}"
        cmdlines = [" ".join(p.cmdline()) for p in procs if p.is_running()]
        for comp in ("scheduler", "dag-processor", "triggerer", "api_server"):   # api-server's process title
            assert any(comp in c for c in cmdlines), (comp, cmdlines)
        _stop_and_check(proc, procs, signal.SIGTERM)
    finally:
        _cleanup(proc)
