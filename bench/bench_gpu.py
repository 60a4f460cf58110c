"""The GPU check's driver (bench/bench_gpu.sh, `make bench-gpu`): bench_train on the chosen device (cuda when
present with `auto`), bench_score's `--device cuda` run when that benchmark exists, one JSON
(BENCH_GPU_OUT, default bench/results/bench_gpu.json)."""
from __future__ import annotations

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
        world = Path(data) if data else bench_train.build_world(work, "tiny" if quick else "default")
        tr = bench_train.run(world, device, quick, work,
                             batch_sizes=None if quick else [256, 1024, 4096, 16384],
                             epochs=1, reps=1, compile_=[16] if quick else [4096])   # torch.compile, one size
        res["bench_train"] = tr
        print(bench_train.table(tr), file=sys.stderr)
        res["large_batch"] = large_batch(world, device, quick, work)
        print(f"large batch: {json.dumps(res['large_batch'])}", file=sys.stderr)
        res["bench_score"] = score(world, device, quick, work)
    res["wall_s"] = time.perf_counter() - t0
    write_json(out, res)
    print(f"bench-gpu: wrote {out} in {res['wall_s']:.0f} s", file=sys.stderr)


def _params(device: torch.device, quick: bool) -> dict:
    """params.yaml on `device` (`--quick`: the tests' small model)."""
    from twinv2.config import load_params

    p = load_params()
    p["train"]["device"] = device.type
    if quick:
        from tests.training.conftest import SMALL_MODEL

        p["model"].update(SMALL_MODEL)
    return p


def large_batch(world: Path, device: torch.device, quick: bool, work: Path) -> dict:
    """`twinv2 train --model twinv2` end to end as a GPU would run it for the 200,000 samples/s goal: batch 4,096
    with the square-root rate rule the valid split kept for large batches (lr and user_bias_lr x sqrt(4,096 / 256);
    docs/models.md, "Large batches") and 4 loader processes feeding the prefetch thread; 2 epochs (`--quick`:
    batch 64, 2 workers, 1 epoch). Training samples/s (median over epochs), wall, best valid GAUC, or the error."""
    import math
    import statistics

    from pipelines import train

    p = _params(device, quick)
    tp = p["train"]
    bs, workers, epochs = (64, 2, 1) if quick else (4096, 4, 2)
    scale = math.sqrt(bs / int(tp["batch_size"]))
    tp.update(batch_size=bs, eval_batch_size=bs, num_workers=workers, epochs=epochs, patience=epochs,
              progress=False, lr=float(tp["lr"]) * scale)
    if tp.get("user_bias_lr") is not None:
        tp["user_bias_lr"] = float(tp["user_bias_lr"]) * scale
    t = time.perf_counter()
    try:
        rep = train.run(world, "twinv2", work / "large_batch", params=p)
    except Exception as e:  # noqa: BLE001 - the JSON says what failed; the other figures still stand
        return {"error": f"{type(e).__name__}: {e}"}
    return {"batch_size": bs, "num_workers": workers, "epochs": epochs, "lr": tp["lr"],
            "user_bias_lr": tp.get("user_bias_lr"), "wall_s": time.perf_counter() - t,
            "train_samples_per_s": statistics.median(h["samples_per_s"] for h in rep["history"]),
            "best_valid_gauc": rep["best_valid_gauc"], "goal_samples_per_s": 200_000}


def score(world: Path, device: torch.device, quick: bool, work: Path) -> dict:
    """bench_score on `device`: a TWIN-V2 run trained for 1 epoch on the world (the small model with --quick),
    then one user x 500 and the batch path (`--quick`: 10 requests, no HTTP). Its JSON, or the error."""
    from pipelines import train

    params = _params(device, quick)
    params["train"].update(epochs=1)
    run = work / "score_run"
    try:
        train.run(world, "twinv2", run, params=params)
    except Exception as e:  # noqa: BLE001 - the JSON says what failed; the train figures above still stand
        return {"error": f"training the scoring run failed: {type(e).__name__}: {e}"}
    cmd = [sys.executable, "-m", "bench.bench_score", "--data", str(world), "--run", str(run), "--device",
           device.type, "--out", str(work / "score")] + (["--quick"] if quick else [])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    got = work / "score" / "bench_score.json"
    if r.returncode == 0 and got.exists():
        return json.loads(got.read_text())
    return {"error": (r.stderr or r.stdout).strip()[-2000:], "returncode": r.returncode}


if __name__ == "__main__":
    main()
