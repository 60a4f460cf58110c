"""The GPU check's driver (bench/bench_gpu.sh, `make bench-gpu`): bench_train on the chosen device (cuda when
present with `auto`), bench_score's `--device cuda` run when that benchmark exists, one JSON
(BENCH_GPU_OUT, default bench/results/bench_gpu.json)."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_train  # noqa: E402
from twinv2.io import write_json  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    want = os.environ.get("BENCH_GPU_DEVICE", "auto")
    quick = os.environ.get("BENCH_GPU_QUICK") == "1"
    out = Path(os.environ.get("BENCH_GPU_OUT", ROOT / "bench" / "results" / "bench_gpu.json"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if (want == "cuda" or (want == "auto" and cuda)) else "cpu")
    res = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": cuda,
           "gpu": torch.cuda.get_device_name(0) if cuda else None, "host": platform.node(),
           "cpu_count": os.cpu_count(), "device": device.type, "quick": quick}
    if want == "cuda" and not cuda:
        res["error"] = "CUDA requested but torch sees no CUDA device (a CPU-only torch build or no GPU)"
        write_json(out, res)
        print(json.dumps(res, indent=2))
        sys.exit(2)
    data = os.environ.get("BENCH_GPU_DATA")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tr = bench_train.run(Path(data) if data else None, device, quick, work,
                             batch_sizes=None if quick else [256, 1024, 4096, 16384],
                             epochs=1, reps=1)
    res["bench_train"] = tr
    print(bench_train.table(tr), file=sys.stderr)
    if importlib.util.find_spec("bench.bench_score") is not None and not quick:
        score_json = out.with_name("bench_score_gpu.json")
        r = subprocess.run([sys.executable, "-m", "bench.bench_score", "--device", device.type, "--out",
                            str(score_json)], cwd=ROOT, capture_output=True, text=True, timeout=240)
        res["bench_score"] = (json.loads(score_json.read_text()) if r.returncode == 0 and score_json.exists() else
                              {"error": (r.stderr or r.stdout).strip()[-2000:], "returncode": r.returncode})
    else:
        res["bench_score"] = None if quick else {"error": "bench/bench_score.py not present"}
    res["wall_s"] = time.perf_counter() - t0
    write_json(out, res)
    print(f"bench-gpu: wrote {out} in {res['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
