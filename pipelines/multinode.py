"""Multi-node training: the torchrun command of every node, and a launcher of N local nodes.

One node of an N-node run is one `torchrun` process (its agent) with its worker(s); the nodes meet through
torchrun's c10d rendezvous at one endpoint (host:port, reachable from every node) under one run id:

    torchrun --nnodes N --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID \\
        --max-restarts 0 -m pipelines.cli [--params FILE] train --data DIR --model NAME --out RUNDIR [--resume]

Every node runs the same command (on Kubernetes or Slurm: one pod / task per node; docs/scaling.md,
"Multi-node training"); the rendezvous assigns the ranks, rank 0 writes RUNDIR (a shared file system). The
DAG's train task (Param `train_nodes` > 1) starts N such nodes on its own machine through `run_local`. A
lost node fails the others (twinv2.training.ddp: PeerLost, or torchrun's rendezvous error when the lost
node hosted the endpoint); relaunching every node with --resume continues from the newest checkpoint.

Light at import (no torch): the DAG's task imports it inside its body.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from twinv2.config import REPO_ROOT, load_params
from twinv2.io import read_json

LAUNCH_DIR = "launch"          # RUNDIR/launch/: the params every node reads, and one log per node


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_argv(nodes: int, endpoint: str, rdzv_id: str, nproc_per_node: int = 1) -> list[str]:
    """The launcher part of one node's command (the same on every node). `python -m torch.distributed.run`
    is `torchrun` without relying on PATH. No restarts: a lost node fails the run clearly, and the relaunch
    (--resume) is the caller's (an Airflow retry, a Kubernetes Job's backoff, a Slurm requeue)."""
    if int(nodes) < 1 or int(nproc_per_node) < 1:
        raise ValueError(f"nodes={nodes}, nproc_per_node={nproc_per_node}: expected integers >= 1")
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(int(nodes)),
            "--nproc_per_node", str(int(nproc_per_node)), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", rdzv_id, "--max-restarts", "0"]


def train_argv(data: str | Path, model: str, out: str | Path, params_file: str | Path | None = None,
               resume: bool = False, warm_start: str | Path | None = None) -> list[str]:
    """The `twinv2 train` part of one node's command (a module, so that torchrun runs it in every worker)."""
    argv = ["-m", "pipelines.cli"]
    if params_file:
        argv += ["--params", str(params_file)]
    argv += ["train", "--data", str(data), "--model", model, "--out", str(out)]
    if resume:
        argv.append("--resume")
    if warm_start:
        argv += ["--warm-start", str(warm_start)]
    return argv


def node_env(nodes: int, extra: dict | None = None) -> dict:
    """The environment of a local node: the repository importable; the machine's cores shared between the
    nodes (OMP_NUM_THREADS, unless set), since N local nodes would otherwise each use every core."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(int(nodes), 1))))
    return env


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    mine = [ln for ln in lines if ln.startswith(("twinv2 ", "torch.distributed.elastic"))
            or "Error" in ln[:200]]
    return "\n".join((mine or lines)[-n:])


def stop_node(p: subprocess.Popen) -> None:
    """End one node: its agent's process group and (torchrun starts them in sessions of their own) its
    workers."""
    if p.poll() is not None:
        return
    try:
        import psutil

        kids = psutil.Process(p.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - already gone, or psutil missing: the group kill below still runs
        kids = []
    for k in kids:
        try:
            k.kill()
        except Exception:  # noqa: BLE001
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def run_local(data: str | Path, model: str, out: str | Path, params: dict | None = None, nodes: int = 2,
              resume: bool = False, warm_start: str | Path | None = None, port: int | None = None,
              rdzv_id: str | None = None, grace_s: float | None = None) -> dict:
    """Train one model as `nodes` torchrun nodes on this machine (c10d rendezvous on 127.0.0.1) and return
    rank 0's report (RUNDIR/train_metrics.json) plus the launch. Node 0 starts first and hosts the
    rendezvous endpoint; the others join it. When a node fails, the others get `grace_s` (default: the
    collective timeout + 60 s) to fail on their own, then are stopped; the error names every node's exit
    code and the end of its log (RUNDIR/launch/node-K.log)."""
    from twinv2.training.ddp import timeout_s

    nodes = int(nodes)
    data, out = Path(data).resolve(), Path(out).resolve()       # the nodes run in the repository root
    warm_start = Path(warm_start).resolve() if warm_start else None
    if nodes < 1:
        raise ValueError(f"train_nodes={nodes}: expected an integer >= 1")
    launch = out / LAUNCH_DIR
    launch.mkdir(parents=True, exist_ok=True)
    params_file = launch / "params.yaml"                   # every node reads exactly these settings
    params_file.write_text(yaml.safe_dump(params if params is not None else load_params(), sort_keys=False))
    port = int(port or free_port())
    endpoint = f"127.0.0.1:{port}"
    rdzv_id = rdzv_id or f"twinv2-{out.name}-{port}"
    cmd = torchrun_argv(nodes, endpoint, rdzv_id) + train_argv(data, model, out, params_file, resume, warm_start)
    env = node_env(nodes)
    grace = float(grace_s if grace_s is not None else timeout_s() + 60.0)
    procs: list[subprocess.Popen] = []
    logs = [launch / f"node-{k}.log" for k in range(nodes)]
    t0 = time.perf_counter()
    try:
        for k in range(nodes):
            with open(logs[k], "w") as log:
                procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            if k == 0:                            # node 0 hosts the c10d store: let it bind before the rest
                while not _listening(port) and procs[0].poll() is None and time.perf_counter() - t0 < 120:
                    time.sleep(0.1)
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.perf_counter()
            if failed_at is not None and time.perf_counter() - failed_at > grace:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            stop_node(p)
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        detail = "\n".join(f"--- node {k} (exit {c}, {logs[k]}):\n{_tail(logs[k])}" for k, c in enumerate(codes))
        raise RuntimeError(f"multi-node training of {model!r} failed on {sum(c != 0 for c in codes)} of {nodes} "
                           f"local nodes (rendezvous {endpoint}, id {rdzv_id}); rerun with resume to continue "
                           f"from the newest checkpoint in {out / 'checkpoints'}:\n{detail}")
    report = read_json(out / "train_metrics.json")
    report.update(nodes=nodes, rdzv_endpoint=endpoint, launch_wall_s=time.perf_counter() - t0)
    return report
