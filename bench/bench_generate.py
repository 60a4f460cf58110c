"""Generation throughput (behaviour rows/s) and peak memory (RSS) of `twinv2 generate`, per preset.

    python bench/bench_generate.py                # tiny and default, 3 repeats each (medians quoted)
    python bench/bench_generate.py --large        # also the large preset (~12M behaviours), 1 repeat

Each run is a fresh child process so its peak RSS (os.wait4 ru_maxrss) is its own. Prints a table and
JSON, and writes bench/results/bench_generate.json. `in_memory_mb` is what the run's behaviours would
take as plain columns (8+8+8+4+4+1+4 bytes a row): peak RSS far below it shows generation streams.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BYTES_PER_ROW = 8 + 8 + 8 + 4 + 4 + 1 + 4


def _child(preset: str, out: str, seed: int) -> None:
    sys.path.insert(0, str(REPO))
    from pipelines import generate
    from twinv2.config import load_params

    rep = generate.run(preset, out, seed=seed, params=load_params())
    print(json.dumps({k: rep[k] for k in ("n_behaviors", "n_impressions", "seconds", "rows_per_s",
                                          "history_p50", "history_p90", "history_max", "oracle_auc",
                                          "oracle_auc_overall", "oracle_auc_without_dormant")}))


def run_once(preset: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench_gen_{preset}_") as tmp:
        cmd = [sys.executable, __file__, "--child", preset, str(Path(tmp) / "world"), str(seed)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"generate {preset} failed (exit {proc.returncode})")
        res = json.loads(out.decode().strip().splitlines()[-1])
        res["disk_mb"] = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 2**20
    res["peak_rss_mb"] = usage.ru_maxrss / 1024            # Linux: KiB
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also run the large preset (1 repeat)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--child", nargs=3, metavar=("PRESET", "OUT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return

    plan = [("tiny", args.repeats), ("default", args.repeats)] + ([("large", 1)] if args.large else [])
    rows = []
    for preset, reps in plan:
        runs = [run_once(preset, args.seed) for _ in range(reps)]
        r0 = runs[0]
        rows.append({
            "preset": preset, "repeats": reps, "n_behaviors": r0["n_behaviors"], "n_impressions": r0["n_impressions"],
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "rows_per_s_median": statistics.median(r["rows_per_s"] for r in runs),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in runs),
            "in_memory_mb": r0["n_behaviors"] * BYTES_PER_ROW / 2**20,
            "disk_mb": r0["disk_mb"],
            "history_p50": r0["history_p50"], "history_p90": r0["history_p90"], "history_max": r0["history_max"],
            "oracle_auc_test": r0["oracle_auc"], "oracle_auc_overall": r0["oracle_auc_overall"],
            "oracle_auc_without_dormant": r0["oracle_auc_without_dormant"],
        })
    result = {"bench": "generate", "seed": args.seed, "cpus": os.cpu_count(), "presets": rows}

    head = ("preset", "behaviours", "s (med)", "rows/s (med)", "peak RSS MB", "all-in-mem MB", "disk MB",
            "p50", "p90", "max", "oracle AUC test")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([r["preset"], f"{r['n_behaviors']:,}", f"{r['seconds_median']:.2f}",
                          f"{r['rows_per_s_median']:,.0f}", f"{r['peak_rss_mb_median']:.0f}",
                          f"{r['in_memory_mb']:.0f}", f"{r['disk_mb']:.1f}", f"{r['history_p50']:.0f}",
                          f"{r['history_p90']:.0f}", f"{r['history_max']:,}", f"{r['oracle_auc_test']:.4f}"]))
    print(json.dumps(result, indent=2))
    out = REPO / "bench" / "results" / "bench_generate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from twinv2.io import write_json

    write_json(out, result)


if __name__ == "__main__":
    main()
