"""Scoring benchmark (issue 29 item 4): one user x 500 candidates in-process, the batch path over many users,
and the served champion over HTTP, each against the reference path measured side by side in the same run.

    python -m bench.bench_score --data DIR --run RUNDIR [--device cpu|cuda|auto] [--quick]
                                [--serve-uri MLFLOW_TRACKING_URI] [--requests 200]

RUNDIR is a `twinv2 train` run directory on DIR (TWIN-V2, or any model). Measured:
1. one user x `--candidates` (500) candidates, `--reps` requests over different users at the dataset's end time:
   fast = RunScorer.score_user (the serving path), previous = the recipe score_user had before issue 29
   (World.samples on a DataFrame, World.dataset per request, the user's row broadcast, input checks on the
   broadcast batch), reference = RunScorer.predict_frame (every candidate a training sample); p50 / p90 ms,
   the ratios of the medians, max |score difference| against the reference.
2. batch: `--users` users x `--pool` candidates each, score_many (one call) vs predict_frame: rows/s and ratio.
3. HTTP (with --serve-uri: a tracking store holding models:/twinv2@champion): `mlflow models serve -m
   models:/twinv2@champion --env-manager local --host 127.0.0.1` started on a free port, `--requests` requests of
   one user x candidates (one at a time, timeout 30 s each), p50 / p90 ms; the served scores of the first request
   checked equal to the in-process ones; the server is stopped at the end.
Prints JSON and a table; writes bench/results/bench_score.json and bench_score.md (--out to change).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.io import write_json  # noqa: E402
from twinv2.training.loop import autocast, probability  # noqa: E402
from twinv2.training.samples import to_device  # noqa: E402
from twinv2.training.scoring import RunScorer  # noqa: E402


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_score: --device cuda but torch sees no CUDA device")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def previous_score_user(s: RunScorer, user: int, items: np.ndarray, ts: int) -> np.ndarray:
    """score_user as it was before issue 29 (commit 4b5c429): a DataFrame through World.samples, a new SampleSet
    per request, the user's row broadcast over the candidates, the model's input checks on the broadcast batch."""
    n = len(items)
    df = pd.DataFrame({"user_id": np.full(n, int(user), np.int64), "item_id": items, "ts": ts, "label": 0})
    ds = s.world.dataset(s.world.samples(None, df), s.model)
    one = to_device(ds[[0]], s.device)
    batch = {"target": to_device(ds.targets(np.arange(n)), s.device),
             "long": {k: x.expand(n, *x.shape[1:]) for k, x in one["long"].items()},
             "short": {k: x.expand(n, *x.shape[1:]) for k, x in one["short"].items()},
             "user": torch.full((n,), int(user), dtype=torch.int64, device=s.device)}
    if ds.life is not None:
        batch["life"] = ds.life_counts(np.arange(n)).to(s.device)
    with autocast(s.device):
        return probability(s.model(batch).float().cpu().numpy())


def timed(fn, device) -> tuple[float, np.ndarray]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def one_user(s: RunScorer, users, ids, n_cand: int, reps: int, device, rng) -> dict:
    ts = s.default_ts()
    reqs = [(int(users[r % len(users)]), rng.choice(ids, n_cand, replace=False)) for r in range(reps)]
    paths = {"fast": lambda u, it: s.score_user(u, it, ts),
             "previous": lambda u, it: previous_score_user(s, u, it, ts),
             "reference": lambda u, it: s.predict_frame(pd.DataFrame({"user_id": u, "item_id": it, "ts": ts}))["prob"]}
    for fn in paths.values():                                   # warm-up (first-call caches) outside the timing
        fn(*reqs[0])
    lat = {k: [] for k in paths}
    diff = {"previous": 0.0, "fast": 0.0}
    for u, it in reqs:                                          # interleaved: each request by every path in turn
        got = {}
        for k, fn in paths.items():
            ms, got[k] = timed(lambda: fn(u, it), device)
            lat[k].append(ms)
        for k in diff:
            diff[k] = max(diff[k], float(np.abs(got[k] - got["reference"]).max()))
    out = {k: {"p50_ms": pct(v, 50), "p90_ms": pct(v, 90)} for k, v in lat.items()}
    return {"candidates": n_cand, "requests": reps, **out,
            "fast_vs_previous_p50": out["previous"]["p50_ms"] / out["fast"]["p50_ms"],
            "fast_vs_reference_p50": out["reference"]["p50_ms"] / out["fast"]["p50_ms"],
            "max_abs_diff_fast_vs_reference": diff["fast"], "max_abs_diff_previous_vs_reference": diff["previous"],
            "goal_p50_ms": 2.0, "goal_met": out["fast"]["p50_ms"] <= 2.0 if device.type == "cpu" else None}


def batch(s: RunScorer, users, ids, n_users: int, pool: int, device, rng) -> dict:
    us = np.asarray(users[:n_users], np.int64)
    uu = np.repeat(us, pool)
    it = np.concatenate([rng.choice(ids, pool, replace=False) for _ in us])
    ts = s.default_ts()
    s.score_many(uu[:pool], it[:pool], ts)                      # warm-up
    t_fast, fast = timed(lambda: s.score_many(uu, it, ts), device)
    t_ref, ref = timed(lambda: s.predict_frame(pd.DataFrame({"user_id": uu, "item_id": it, "ts": ts}))["prob"], device)
    return {"users": int(len(us)), "pool": pool, "rows": int(len(uu)), "fast_s": t_fast / 1e3, "reference_s": t_ref / 1e3,
            "fast_rows_per_s": len(uu) / (t_fast / 1e3), "reference_rows_per_s": len(uu) / (t_ref / 1e3),
            "fast_vs_reference": t_ref / t_fast, "max_abs_diff": float(np.abs(fast - ref).max())}


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def http(s: RunScorer, uri: str, users, ids, n_cand: int, n_req: int, rng, log: Path) -> dict:
    """Serve the champion on 127.0.0.1, send n_req one-user requests one at a time, stop the server."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ENABLE_TELEMETRY": "false",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/twinv2@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping in 300 s; log {log}")
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        ts = s.default_ts()
        reqs = [(int(users[r % len(users)]), rng.choice(ids, n_cand, replace=False)) for r in range(n_req)]

        def send(u, it):
            body = json.dumps({"dataframe_split": {"columns": ["user_id", "item_id", "ts"],
                                                   "data": [[u, int(i), ts] for i in it]}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                preds = json.loads(r.read())["predictions"]
            return np.array([p["score"] if isinstance(p, dict) else p for p in preds], np.float64)

        send(*reqs[0])                                          # warm-up
        lat, first = [], None
        for u, it in reqs:
            t = time.perf_counter()
            got = send(u, it)
            lat.append((time.perf_counter() - t) * 1e3)
            first = (u, it, got) if first is None else first
        diff = float(np.abs(first[2] - s.score_user(first[0], first[1], ts)).max())
        return {"requests": n_req, "candidates": n_cand, "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90),
                "max_ms": max(lat), "startup_s": startup, "max_abs_diff_vs_in_process": diff,
                "goal_p50_ms": 20.0, "goal_met": pct(lat, 50) <= 20.0}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def table(r: dict) -> str:
    o = r["one_user"]
    lines = [f"# bench_score ({r['device']}, {r['threads']} threads, model {r['model']}, long_len {r['long_len']})", "",
             f"| one user x {o['candidates']} candidates ({o['requests']} requests) | p50 ms | p90 ms |", "|---|---|---|"]
    for k in ("fast", "previous", "reference"):
        lines.append(f"| {k} | {o[k]['p50_ms']:.2f} | {o[k]['p90_ms']:.2f} |")
    lines += ["", f"fast vs previous p50: {o['fast_vs_previous_p50']:.1f}x; fast vs reference p50: "
              f"{o['fast_vs_reference_p50']:.1f}x; max |fast - reference| {o['max_abs_diff_fast_vs_reference']:.1e}"]
    b = r["batch"]
    lines += ["", f"| batch: {b['users']} users x {b['pool']} | rows/s | s |", "|---|---|---|",
              f"| score_many | {b['fast_rows_per_s']:,.0f} | {b['fast_s']:.2f} |",
              f"| predict_frame (reference) | {b['reference_rows_per_s']:,.0f} | {b['reference_s']:.2f} |", "",
              f"batch ratio {b['fast_vs_reference']:.1f}x, max |diff| {b['max_abs_diff']:.1e}"]
    h = r.get("http")
    if h:
        lines += ["", f"HTTP (mlflow models serve, 127.0.0.1, {h['requests']} requests x {h['candidates']} candidates): "
                  f"p50 {h['p50_ms']:.1f} ms, p90 {h['p90_ms']:.1f} ms, max {h['max_ms']:.1f} ms; server start "
                  f"{h['startup_s']:.0f} s; max |served - in-process| {h['max_abs_diff_vs_in_process']:.1e}"]
    else:
        lines += ["", "HTTP: not measured (no --serve-uri)"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--quick", action="store_true", help="10 requests, 8 users x 50 in the batch, no HTTP")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--serve-uri", default=None, help="MLflow tracking URI holding models:/twinv2@champion")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.reps, a.users, a.pool, a.serve_uri = min(a.reps, 10), min(a.users, 8), min(a.pool, 50), None
    device = pick_device(a.device)
    s = RunScorer(a.run, data=a.data, device=device)
    if not isinstance(s.model, torch.nn.Module):
        raise SystemExit("bench_score: a gbdt run has no one-user path to time; pass a neural model's run")
    rng = np.random.default_rng(0)
    users, lengths = s.world.user_lengths()
    users = users[np.argsort(-lengths, kind="stable")]          # the longest histories first
    ids = s.world.items["item_id"].to_numpy(np.int64)
    n_cand = min(a.candidates, len(ids))
    r = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
         "threads": torch.get_num_threads(), "model": s.config["model"], "long_len": s.model.long_len,
         "run": str(a.run), "data": str(a.data), "quick": a.quick}
    r["one_user"] = one_user(s, users, ids, n_cand, a.reps, device, rng)
    r["batch"] = batch(s, users, ids, a.users, min(a.pool, len(ids)), device, rng)
    if a.serve_uri:
        r["http"] = http(s, a.serve_uri, users, ids, n_cand, a.requests, rng, Path(a.out) / "bench_score_serve.log")
    out = Path(a.out)
    write_json(out / "bench_score.json", r)
    md = table(r)
    (out / "bench_score.md").write_text(md + "\n")
    print(json.dumps(r, indent=1))
    print(md)
    return r


if __name__ == "__main__":
    main()
