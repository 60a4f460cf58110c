"""Models benchmark: TWIN on raw life-cycle histories vs TWIN-V2 on their clusters, and cached scoring.

    python bench/bench_models.py [--quick] [--lengths 1000 10000 100000] [--steps 5]

1. Training throughput (samples/s, median over steps) and peak memory against life-cycle length N:
   TWIN reads the raw history (long_len = N), TWIN-V2 the clusters (long_len = N / compression, 10 in the
   paper). Each configuration runs in its own subprocess so its peak memory (CUDA max allocated, or
   the process's max RSS on CPU) is its own. Target: TWIN-V2 at N = 1e5 >= 5x TWIN's samples/s.
2. Online-style scoring: one user against 500 candidates, TWIN-V2 in eval mode, with the item projection
   cache vs without; latency p50/p99.
Runs on CUDA with bf16 autocast when available, else on CPU in fp32; the device is reported.
Prints JSON and a table; writes bench/results/bench_models.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.config import load_params  # noqa: E402
from twinv2.io import write_json  # noqa: E402
from twinv2.models import build_model  # noqa: E402
from twinv2.training.loop import TrainConfig, make_optimizer  # noqa: E402
from twinv2.training.samples import MIX_FIELDS  # noqa: E402

VOCAB = {"item": 200_001, "author": 20_001, "category": 51, "dur_bucket": 21, "cross": [12, 12, 24], "pop": 22}
LIFE_DIM = 4 * len(MIX_FIELDS) + 2      # base.match_counts over the whole life cycle (model.virtual_mix)


def device_info():
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name(0)
    return torch.device("cpu"), None, f"cpu ({torch.get_num_threads()} threads)"


def random_seq(B, L, g, clusters=False):
    mask = torch.ones(B, L, dtype=torch.bool)
    seq = {k: torch.randint(1, VOCAB[k], (B, L), generator=g) for k in ("item", "author", "category", "dur_bucket")}
    seq["cross"] = torch.stack([torch.randint(1, n, (B, L), generator=g) for n in VOCAB["cross"]], -1)
    seq["mask"] = mask
    n = torch.randint(1, 40, (B, L), generator=g) if clusters else torch.ones(B, L)
    seq["log_n"] = torch.log(n.float())
    seq["comp"] = torch.rand(B, L, generator=g) * 1.2            # completion ratio of each row (match counts)
    return seq


def random_batch(B, L, S, g, clusters):
    target = {k: torch.randint(1, VOCAB[k], (B,), generator=g) for k in ("item", "author", "category", "dur_bucket",
                                                                          "pop")}
    target["stats"] = torch.rand(B, 4, generator=g)             # model.target_stats
    target["feedback"] = torch.rand(B, 2, generator=g)          # model.user_feedback
    return {"target": target, "long": random_seq(B, L, g, clusters), "short": random_seq(B, S, g),
            "life": torch.rand(B, LIFE_DIM, generator=g),           # model.virtual_mix: whole-life match counts
            "label": torch.randint(0, 2, (B,), generator=g).float(), "user": torch.arange(B)}


def to(batch, device):
    return {k: (to(v, device) if isinstance(v, dict) else v.to(device)) for k, v in batch.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_one(kind: str, length: int, batch_size: int, steps: int, compression: int) -> dict:
    """One configuration (run in a subprocess): `steps` timed Adam steps after one warm-up step."""
    device, amp, _ = device_info()
    p = dict(load_params()["model"])
    L = length if kind == "twin" else max(1, length // compression)
    p["twin_window"] = L
    torch.manual_seed(0)
    model = build_model(kind, VOCAB, p).to(device).train()
    model.check_inputs = False
    opt = make_optimizer(model, TrainConfig(lr=1e-3))            # what `twinv2 train` uses
    g = torch.Generator().manual_seed(1)
    batches = [to(random_batch(batch_size, L, p["short_len"], g, kind == "twinv2"), device) for _ in range(2)]
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 1):
        b = batches[step % 2]
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b).float(), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if step:                                       # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if device.type == "cuda":
        peak, extra = torch.cuda.max_memory_allocated() / 2**20, (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, extra = rss / 1024, max(0, rss - rss0) / 1024
    return {"model": kind, "history": length, "long_len": L, "batch_size": batch_size, "steps": steps,
            "step_s_median": med, "samples_per_s": batch_size / med, "peak_mem_mib": peak,
            "step_mem_mib": extra}


def scoring(n_candidates: int, n_clusters: int, reps: int) -> dict:
    """One user (n_clusters clusters + short history) against n_candidates candidates, TWIN-V2, eval."""
    device, amp, _ = device_info()
    p = dict(load_params()["model"])
    p["twin_window"] = n_clusters
    torch.manual_seed(0)
    model = build_model("twinv2", VOCAB, p).to(device).eval()
    model.check_inputs = False
    g = torch.Generator().manual_seed(2)
    user = random_batch(1, n_clusters, p["short_len"], g, True)
    cands = random_batch(n_candidates, 1, 1, g, False)["target"]
    # one row per candidate, the user's sequences broadcast (views, no copies)
    batch = {"target": cands,
             "long": {k: v.expand(n_candidates, *v.shape[1:]) for k, v in user["long"].items()},
             "short": {k: v.expand(n_candidates, *v.shape[1:]) for k, v in user["short"].items()},
             "life": torch.rand(n_candidates, LIFE_DIM, generator=g),
             "user": torch.zeros(n_candidates, dtype=torch.int64)}          # model.user_bias: one user
    batch = to(batch, device)
    out = {}
    for mode in ("inline", "cached"):
        if mode == "cached":
            model.build_item_cache()
        lat = []
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for r in range(reps + 3):
                sync(device)
                t0 = time.perf_counter()
                y = model(batch)
                sync(device)
                if r >= 3:
                    lat.append((time.perf_counter() - t0) * 1e3)
        lat.sort()
        out[mode] = {"p50_ms": statistics.median(lat), "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                     "scores": y.float().cpu()}
    diff = float((out["inline"].pop("scores") - out["cached"].pop("scores")).abs().max())
    return {"candidates": n_candidates, "clusters": n_clusters, "reps": reps, **out,
            "speedup_p50": out["inline"]["p50_ms"] / out["cached"]["p50_ms"], "max_abs_score_diff": diff}


def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                "args": args}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compression", type=int, default=10, help="history length / number of clusters (paper ~10)")
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--score-clusters", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="lengths 1e3, 1e4; 3 steps; 20 reps")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_models.json"))
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    device, amp, name = device_info()
    if a.child:
        if a.child[0] == "train":
            res = train_one(a.child[1], int(a.child[2]), int(a.child[3]), int(a.child[4]), int(a.child[5]))
        else:
            res = scoring(int(a.child[1]), int(a.child[2]), int(a.child[3]))
        print(json.dumps(res))
        return
    if a.quick:
        a.lengths, a.steps, a.reps = [1_000, 10_000], 3, 20
    bs = a.batch_size or (64 if device.type == "cuda" else 8)
    rows = []
    for n in a.lengths:
        for kind in ("twin", "twinv2"):
            rows.append(run_child(["--child", "train", kind, str(n), str(bs), str(a.steps), str(a.compression)]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    sps = {(r.get("model"), r.get("history")): r.get("samples_per_s") for r in rows}
    ratios = {str(n): (sps[("twinv2", n)] / sps[("twin", n)]
                       if sps.get(("twinv2", n)) and sps.get(("twin", n)) else None) for n in a.lengths}
    score = run_child(["--child", "score", str(a.candidates), str(a.score_clusters), str(a.reps)])
    top = str(max(a.lengths))
    result = {"device": name, "precision": "bf16 autocast" if amp is not None else "fp32",
              "torch": torch.__version__, "batch_size": bs, "compression": a.compression, "train": rows,
              "twinv2_over_twin_throughput": ratios, "scoring": score,
              "target": {"history": int(top), "ratio_min": 5.0, "ratio": ratios[top],
                         "met": bool(ratios[top] is not None and ratios[top] >= 5.0)}}
    write_json(a.out, result)
    print(json.dumps(result, indent=2))
    print(f"\ndevice: {result['device']}  precision: {result['precision']}  batch: {bs}  "
          f"(clusters = history / {a.compression})")
    print(f"{'model':8} {'history':>8} {'long_len':>8} {'samples/s':>10} {'step ms':>9} {'peak MiB':>9} {'step MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"  failed: {r}")
            continue
        print(f"{r['model']:8} {r['history']:>8} {r['long_len']:>8} {r['samples_per_s']:>10.1f} "
              f"{1e3 * r['step_s_median']:>9.1f} {r['peak_mem_mib']:>9.0f} {r['step_mem_mib']:>9.0f}")
    for n, q in ratios.items():
        print(f"TWIN-V2 / TWIN throughput at history {n}: {q:.2f}x" if q else f"history {n}: n/a")
    if "error" not in score:
        print(f"scoring 1 user x {score['candidates']} candidates ({score['clusters']} clusters): "
              f"inline p50 {score['inline']['p50_ms']:.2f} ms p99 {score['inline']['p99_ms']:.2f} ms | "
              f"cached p50 {score['cached']['p50_ms']:.2f} ms p99 {score['cached']['p99_ms']:.2f} ms | "
              f"speed-up {score['speedup_p50']:.2f}x, max |diff| {score['max_abs_score_diff']:.2e}")
    else:
        print(f"scoring failed: {score}")


if __name__ == "__main__":
    main()
