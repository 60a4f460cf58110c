"""Validation throughput against generation throughput, on the same world, in one run.

    python bench/bench_validate.py [--preset default] [--repeats 3]

Generates the world `--repeats` times (rows/s of generate), then validates it `--repeats` times
(rows/s of validate, with GX confirming every batch, and once more without GX to show its share).
Rows = items + behaviours + impressions. Medians; the ratio validate/generate is measured in this run.
Target: validation must not dominate a run (ratio reported, not asserted).
Prints JSON and a table; writes bench/results/bench_validate.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")

from twinv2.config import load_params  # noqa: E402
from twinv2.io import write_json  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default", choices=["tiny", "default", "large"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from pipelines import generate, validate

    params = load_params()
    work = Path(tempfile.mkdtemp(prefix="bench_validate."))
    try:
        gen_s, val_s, val_nogx_s = [], [], []
        rows = None
        for _ in range(args.repeats):
            shutil.rmtree(work / "world", ignore_errors=True)
            t = time.perf_counter()
            generate.run(preset=args.preset, out=work / "world", seed=0, params=params)
            gen_s.append(time.perf_counter() - t)
        import great_expectations  # noqa: F401  (import once, outside the timings)
        for _ in range(args.repeats):
            t = time.perf_counter()
            rep = validate.run(work / "world", params)
            val_s.append(time.perf_counter() - t)
            rows = sum(rep["tables"][k]["rows_in"] for k in rep["tables"])
        nogx = copy.deepcopy(params)
        nogx.setdefault("validate", {})["gx_confirm"] = False
        for _ in range(args.repeats):
            t = time.perf_counter()
            validate.run(work / "world", nogx)
            val_nogx_s.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = statistics.median
    out = {"preset": args.preset, "repeats": args.repeats, "rows": rows,
           "generate_s": med(gen_s), "validate_s": med(val_s), "validate_no_gx_s": med(val_nogx_s),
           "generate_rows_per_s": rows / med(gen_s), "validate_rows_per_s": rows / med(val_s),
           "validate_no_gx_rows_per_s": rows / med(val_nogx_s),
           "validate_over_generate_time": med(val_s) / med(gen_s),
           "gx_share_of_validate": 1 - med(val_nogx_s) / med(val_s),
           "all": {"generate_s": gen_s, "validate_s": val_s, "validate_no_gx_s": val_nogx_s},
           "cpus": os.cpu_count()}
    print(json.dumps(out, indent=2))
    print(f"\n{'stage':<22}{'median s':>10}{'rows/s':>14}")
    for name, s in (("generate", out["generate_s"]), ("validate (GX on)", out["validate_s"]),
                    ("validate (GX off)", out["validate_no_gx_s"])):
        print(f"{name:<22}{s:>10.2f}{rows / s:>14,.0f}")
    print(f"validate / generate time: {out['validate_over_generate_time']:.2f}x; "
          f"GX share of validate: {out['gx_share_of_validate']:.0%}")
    write_json(ROOT / "bench" / "results" / "bench_validate.json", out)
    return out


if __name__ == "__main__":
    main()
