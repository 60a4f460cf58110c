"""Ingest throughput (lines/s) and peak RSS per format on generated files in the real formats.

    python bench/bench_ingest.py [--lines 1000000] [--repeats 3]

Writes bench/results/bench_ingest.json and prints a table. Each run is a fresh subprocess so that
its peak RSS (ru_maxrss) is its own; the figure quoted is the median over repeats. About 0.1% of the
lines are malformed (text glued on a timestamp) so the quarantine path is exercised too."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def make_files(root: Path, n: int, seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, max(n // 500, 10), n)
    items = rng.integers(0, 20_000, n)
    bad = rng.random(n) < 0.001
    out = {}
    # KuaiRand
    kr = root / "kuairand"
    kr.mkdir(parents=True)
    with open(kr / "video_features_basic_bench.csv", "w") as f:
        f.write("video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
                "server_width,server_height,music_id,music_type,tag\n")
        for v in range(20_000):
            f.write(f'{v},{v % 3000},NORMAL,2022-04-10,Web,0.0,{5000 + v * 7 % 200000}.0,720.0,1280.0,1,9.0,"{v % 60 + 1},{v % 7 + 1}"\n')
    ts = 1649347200000 + rng.integers(0, 14 * 86400000, n)
    click = (rng.random(n) < 0.4).astype(int)
    play = click * rng.integers(500, 60000, n)
    with open(kr / "log_standard_bench.csv", "w") as f:
        f.write("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
                "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab\n")
        f.writelines(f"{u},{v},20220408,1200,{t}{'abc' if b else ''},{c},0,0,0,0,0,{c},{p},30000,0,0,0,0,1\n"
                     for u, v, t, c, p, b in zip(users, items, ts, click, play, bad))
    out["kuairand"] = kr
    # MovieLens ratings.csv
    ml = root / "ml"
    ml.mkdir()
    with open(ml / "movies.csv", "w") as f:
        f.write("movieId,title,genres\n")
        f.writelines(f'{i},"Movie, {i}",Drama|Comedy\n' for i in range(20_000))
    sec = 1_100_000_000 + rng.integers(0, 365 * 86400, n)
    rating = rng.integers(1, 11, n) / 2
    with open(ml / "ratings.csv", "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        f.writelines(f"{u},{i},{r:.1f},{s}{'abc' if b else ''}\n" for u, i, r, s, b in zip(users, items, rating, sec, bad))
    out["movielens"] = ml
    # Taobao
    tb = root / "taobao"
    tb.mkdir()
    act = np.array(["pv", "fav", "cart", "buy"])[rng.choice(4, n, p=[.88, .03, .06, .03])]
    sec = 1511539200 + rng.integers(0, 9 * 86400, n)
    with open(tb / "UserBehavior.csv", "w") as f:
        f.writelines(f"{u},{i},{4000000 + i % 900},{a},{s}{'abc' if b else ''}\n"
                     for u, i, a, s, b in zip(users, items, act, sec, bad))
    out["taobao"] = tb
    return out


def one(fmt: str, src: str, out: str) -> None:
    sys.path.insert(0, str(REPO))
    from pipelines import ingest

    t = time.perf_counter()
    r = ingest.run(fmt, src, out, progress=False)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "lines": r["lines_read"], "quarantined": r["lines_quarantined"],
                      "behaviors": r["rows"]["behaviors"], "impressions": r["rows"]["impressions"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=3, metavar=("FMT", "SRC", "OUT"))
    a = ap.parse_args()
    if a.one:
        return one(*a.one)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        files = make_files(Path(tmp), a.lines)
        for fmt, src in files.items():
            runs = []
            for k in range(a.repeats):
                p = subprocess.run([sys.executable, __file__, "--one", fmt, str(src), f"{tmp}/out-{fmt}-{k}"],
                                   capture_output=True, text=True, check=True, cwd=REPO)
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            sec = statistics.median(r["seconds"] for r in runs)
            results[fmt] = {"lines": runs[0]["lines"], "quarantined": runs[0]["quarantined"],
                            "behaviors": runs[0]["behaviors"], "impressions": runs[0]["impressions"],
                            "median_seconds": round(sec, 3), "lines_per_s": round(runs[0]["lines"] / sec),
                            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
                            "seconds_all": [round(r["seconds"], 3) for r in runs]}
    out = {"bench": "ingest", "lines_per_file": a.lines, "repeats": a.repeats, "results": results}
    dest = REPO / "bench/results/bench_ingest.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"\n{'format':<10} {'lines':>10} {'quar.':>6} {'median s':>9} {'lines/s':>10} {'peak RSS MB':>12}")
    for fmt, r in results.items():
        print(f"{fmt:<10} {r['lines']:>10,} {r['quarantined']:>6} {r['median_seconds']:>9} "
              f"{r['lines_per_s']:>10,} {r['peak_rss_mb']:>12}")


if __name__ == "__main__":
    main()
