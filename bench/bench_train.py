"""Training throughput of the real training path (issue 29), for TWIN-V2 and TWIN:

    python -m bench.bench_train --data DIR [--device cpu|cuda|auto] [--quick] [--out bench/results/bench_train.json]

DIR: a generated, validated and clustered world (`twinv2 generate --preset default --out DIR --seed 7`,
`twinv2 validate --data DIR`, `twinv2 cluster --data DIR`); without --data the world is built under
--work (preset --preset, seed 7).

1. input: the input pipeline alone, from the loaded stores to ready batch tensors (no model), train batches in
   the training order: the reference assembly (SampleSet.reference_batch) vs the fast path (fastbatch), samples
   per second and per CPU-second (process time, i.e. per core: numpy here runs on one thread);
2. step: the model step alone (forward, BCE, backward, the training optimizer) on a resident batch of the world,
   over batch sizes: samples/s, median step ms, peak memory (CUDA max allocated; on CPU the process's max RSS,
   which only grows); and on the large world's history lengths (synthetic batches as bench/bench_models.py:
   TWIN reads N raw rows, TWIN-V2 N / 10 clusters);
3. end to end: `twinv2 train` (pipelines.train.run, MLflow off) with the old configuration (reference batches,
   no prefetch: train.fast_batches false, train.prefetch 0) and the new one, side by side in one run
   (alternating old, new), training samples/s of the epochs and the whole run's wall time.
bf16 autocast on CUDA, fp32 on CPU (the training loop's rule). Prints JSON and a table.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.config import load_params  # noqa: E402
from twinv2.io import write_json  # noqa: E402

MODELS = ("twinv2", "twin")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                         f"(torch.version.cuda = {torch.version.cuda}); use --device cpu or auto")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_world(work: Path, preset: str) -> Path:
    from pipelines import cluster, generate, validate

    params = load_params()
    data = work / f"world-{preset}"
    if not (data / "clusters" / "CURRENT").exists():
        generate.run(preset=preset, out=data, seed=7, params=params)
        validate.run(data=data, params=params)
        cluster.run(data=data, params=params)
    return data


# ---------------------------------------------------------------- 1. input pipeline


def input_pipeline(world, model, params: dict, n_batches: int) -> dict:
    from twinv2.training.samples import BatchOrder

    bs = int(params["train"]["batch_size"])
    ds = world.dataset(world.samples("train"), model)
    order = BatchOrder(len(ds), bs, shuffle=True, seed=0)
    order.set_epoch(1)
    batches = [np.asarray(b) for b in list(order)[:n_batches]]
    out = {"batch_size": bs, "batches": len(batches), "samples": int(sum(len(b) for b in batches))}
    for mode in ("reference", "fast", "fit"):
        ds.fast = mode != "reference"
        ds[batches[0]]                                      # warm-up (the fast path packs its table once)
        if mode == "fit":       # as training.loop.fit runs it: the per-sample inputs once for the whole set
            from twinv2.training.fastbatch import per_sample

            ds.per_sample = True
            t, c = time.perf_counter(), time.process_time()
            per_sample(ds)
            once = {"once_s": time.perf_counter() - t, "once_cpu_s": time.process_time() - c, "set_size": len(ds)}
        wall, cpu = [], []
        for _ in range(2):
            t, c = time.perf_counter(), time.process_time()
            for b in batches:
                ds[b]
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[mode] = {"samples_per_s": out["samples"] / min(wall),
                     "samples_per_cpu_s": out["samples"] / min(cpu)}
        if mode == "fit":       # one epoch over the set, the one-time part included
            r = out[mode]["samples_per_cpu_s"]
            out[mode].update(once, epoch_samples_per_cpu_s=len(ds) / (len(ds) / r + once["once_cpu_s"]))
    out["speedup_per_core"] = out["fast"]["samples_per_cpu_s"] / out["reference"]["samples_per_cpu_s"]
    out["fit_speedup_per_core"] = out["fit"]["epoch_samples_per_cpu_s"] / out["reference"]["samples_per_cpu_s"]
    return out


# ---------------------------------------------------------------- 2. model step


def _peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(model, batch, device, steps: int, compiled: bool = False) -> dict:
    """Median step (forward, backward, optimizer) on one resident batch; `compiled`: through torch.compile
    (inductor, static shapes), its first step (the compilation) timed apart as compile_s."""
    from twinv2.training.loop import TrainConfig, autocast, make_optimizer

    model = model.to(device).train()
    model.check_inputs = False
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    fwd = torch.compile(model, dynamic=False) if compiled else model
    from twinv2.training.samples import to_device

    b = to_device(batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, first = [], 0.0
    for step in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(fwd(b).float(), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if step:
            times.append(time.perf_counter() - t0)
        else:
            first = time.perf_counter() - t0
    med = statistics.median(times)
    n = len(batch["label"])
    out = {"batch_size": n, "steps": steps, "step_ms": 1e3 * med, "samples_per_s": n / med,
           "peak_mem_mib": _peak_mib(device)}
    return {**out, "compile_s": first} if compiled else out


def compiled_steps(model, batch, device, steps: int) -> dict:
    """time_steps through torch.compile, or the error that stopped it (no compiler, no triton, ...)."""
    try:
        return time_steps(model, batch, device, steps, compiled=True)
    except Exception as e:  # noqa: BLE001 - a benchmark row records why compilation failed
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def as_trained(model, params: dict):
    """`model` as pipelines.train prepares it for training: its tables of model.frozen_tables frozen."""
    from pipelines.train import freeze_tables

    freeze_tables(model, params["model"].get("frozen_tables") or ())
    return model


def trained_model(name: str, vocab, params: dict):
    """pipelines.train.build(name, vocab, params), as_trained."""
    from pipelines.train import build

    return as_trained(build(name, vocab, params), params)


def model_steps(world, name: str, params: dict, batch_sizes, steps: int, device, compile_=False) -> list[dict]:
    """Per batch size: the eager step and, with compile_ (True: every size; a list: those sizes), the same model
    (same init, same batch) compiled. The model is built as `twinv2 train` builds it (model.frozen_tables kept
    at their init: no gradient, no optimizer state)."""
    ds = world.dataset(world.samples("train"), trained_model(name, world.vocab, params))
    rows = []
    for bs in batch_sizes:
        bs = min(int(bs), len(ds))
        idx = np.random.default_rng(0).permutation(len(ds))[:bs]
        torch.manual_seed(0)
        row = {"model": name, **time_steps(trained_model(name, world.vocab, params), ds[idx], device, steps)}
        if compile_ is True or (compile_ and bs in compile_):
            torch.manual_seed(0)
            c = compiled_steps(trained_model(name, world.vocab, params), ds[idx], device, steps)
            row["compiled"] = c
            if "step_ms" in c:
                row["compile_speedup"] = row["step_ms"] / c["step_ms"]
        rows.append(row)
    return rows


def length_steps(lengths, batch_size: int, steps: int, compression: int, device) -> list[dict]:
    """The large world's history lengths on synthetic batches (bench_models.random_batch)."""
    from bench.bench_models import VOCAB, random_batch
    from twinv2.models import build_model

    rows = []
    for n in lengths:
        for kind in MODELS:
            p = load_params()
            L = n if kind == "twin" else max(1, n // compression)
            p["model"]["twin_window"] = L
            torch.manual_seed(0)
            model = as_trained(build_model(kind, VOCAB, p["model"]), p)
            batch = random_batch(batch_size, L, p["model"]["short_len"], torch.Generator().manual_seed(1),
                                 kind == "twinv2")
            rows.append({"model": kind, "history": n, "long_len": L, **time_steps(model, batch, device, steps)})
    return rows


# ---------------------------------------------------------------- 3. end to end


CONFIGS = {"old": {"fast_batches": False, "prefetch": 0}, "new": {"fast_batches": True, "prefetch": 2}}


def end_to_end(data: Path, name: str, params: dict, epochs: int, device, work: Path, reps: int,
               compiled: bool = False) -> dict:
    """`twinv2 train` with the old and new input paths (and, with `compiled`, new + train.compile), alternating."""
    from pipelines import train

    configs = {**CONFIGS, "compiled": {**CONFIGS["new"], "compile": True}} if compiled else CONFIGS
    out = {}
    for rep in range(reps):
        for cfg, over in configs.items():
            p = copy.deepcopy(params)
            p["train"].update(over, epochs=epochs, patience=epochs, progress=False, device=device.type)
            t = time.perf_counter()
            rep_ = train.run(data, name, work / f"run-{name}-{cfg}-{rep}", p)
            wall = time.perf_counter() - t
            sps = [h["samples_per_s"] for h in rep_["history"]]
            out.setdefault(cfg, []).append({"train_samples_per_s": statistics.median(sps), "wall_s": wall,
                                            "best_valid_gauc": rep_["best_valid_gauc"]})
    res = {"model": name, "epochs": epochs, "batch_size": int(params["train"]["batch_size"]), "reps": reps}
    for cfg in configs:
        res[cfg] = {"train_samples_per_s": statistics.median(r["train_samples_per_s"] for r in out[cfg]),
                    "wall_s": statistics.median(r["wall_s"] for r in out[cfg]),
                    "best_valid_gauc": [r["best_valid_gauc"] for r in out[cfg]], "runs": out[cfg]}
    res["speedup"] = res["new"]["train_samples_per_s"] / res["old"]["train_samples_per_s"]
    res["same_valid_gauc"] = res["old"]["best_valid_gauc"] == res["new"]["best_valid_gauc"]
    if compiled:
        res["compiled_speedup"] = res["compiled"]["train_samples_per_s"] / res["new"]["train_samples_per_s"]
        res["compiled_wall_ratio"] = res["new"]["wall_s"] / res["compiled"]["wall_s"]
    return res


# ---------------------------------------------------------------- main


def run(data: Path | None, device: torch.device, quick: bool, work: Path, preset: str = "default",
        batch_sizes=None, lengths=None, steps: int = 5, epochs: int = 1, reps: int = 1, n_batches: int = 40,
        compile_: bool = False) -> dict:
    from twinv2.models import REGISTRY
    from twinv2.training.world import load_world
    from pipelines.train import build

    for k in ("MLFLOW_TRACKING_URI", "TWINV2_MLFLOW", "MLFLOW_RUN_ID"):
        os.environ.pop(k, None)
    t_all = time.perf_counter()
    data = Path(data) if data is not None else build_world(work, "tiny" if quick else preset)
    params = load_params()
    if quick:
        from tests.training.conftest import SMALL_MODEL

        params["model"].update(SMALL_MODEL)
        params["train"].update(batch_size=64)
        batch_sizes, lengths, steps, epochs, n_batches = batch_sizes or [16, 64], lengths or [200], 2, 1, 4
    batch_sizes = batch_sizes or ([256, 1024, 4096] if device.type == "cpu" else [256, 1024, 4096, 16384])
    lengths = lengths or [1_000, 10_000, 100_000]
    res = {"data": str(data), "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
           "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "torch": torch.__version__,
           "cpu_threads": torch.get_num_threads(), "quick": quick, "input": {}, "step": [], "lengths": [],
           "end_to_end": {}}
    world = load_world(data, need_clusters=True, features=params["train"].get("features"))
    for name in MODELS:
        model = build(name, world.vocab, params)
        assert getattr(REGISTRY[name], "long_source", "raw") == model.long_source
        res["input"][name] = input_pipeline(world, model, params, n_batches)
        res["step"] += model_steps(world, name, params, batch_sizes, steps, device, compile_)
    res["lengths"] = length_steps(lengths, 8 if device.type == "cpu" and not quick else (2 if quick else 64),
                                  steps, 10, device)
    for name in MODELS:
        res["end_to_end"][name] = end_to_end(data, name, params, epochs, device, work, reps, bool(compile_))
    res["wall_s"] = time.perf_counter() - t_all
    return res


def table(res: dict) -> str:
    lines = [f"device: {res['device']}  precision: {res['precision']}  torch {res['torch']}  "
             f"threads {res['cpu_threads']}  data {res['data']}", "",
             "input pipeline (train batches, no model; fit: fast + the per-sample inputs once per set, an epoch's "
             "rate with that once)",
             f"{'model':8} {'batch':>6} {'ref samples/s':>14} {'fast samples/s':>15} {'ref /cpu-s':>11} "
             f"{'fast /cpu-s':>12} {'x/core':>7} {'fit /cpu-s':>11} {'once s':>7} {'epoch /cpu-s':>13} {'x/core':>7}"]
    for m, r in res["input"].items():
        f = r["fit"]
        lines.append(f"{m:8} {r['batch_size']:>6} {r['reference']['samples_per_s']:>14,.0f} "
                     f"{r['fast']['samples_per_s']:>15,.0f} {r['reference']['samples_per_cpu_s']:>11,.0f} "
                     f"{r['fast']['samples_per_cpu_s']:>12,.0f} {r['speedup_per_core']:>7.2f} "
                     f"{f['samples_per_cpu_s']:>11,.0f} {f['once_s']:>7.2f} {f['epoch_samples_per_cpu_s']:>13,.0f} "
                     f"{r['fit_speedup_per_core']:>7.2f}")
    lines += ["", "model step on a resident batch of the world",
              f"{'model':8} {'batch':>6} {'step ms':>9} {'samples/s':>11} {'peak MiB':>9}"]
    for r in res["step"]:
        c = r.get("compiled")
        comp = "" if c is None else (f"   compiled: {c['error']}" if "error" in c else
                                     f"   compiled: {c['step_ms']:.1f} ms ({r['compile_speedup']:.2f}x), "
                                     f"compile {c['compile_s']:.1f} s")
        lines.append(f"{r['model']:8} {r['batch_size']:>6} {r['step_ms']:>9.1f} {r['samples_per_s']:>11,.0f} "
                     f"{r['peak_mem_mib']:>9,.0f}{comp}")
    lines += ["", "model step at the large world's lengths (synthetic batches; TWIN-V2 reads N / 10 clusters)",
              f"{'model':8} {'history':>8} {'long_len':>8} {'batch':>6} {'step ms':>9} {'samples/s':>11}"]
    for r in res["lengths"]:
        lines.append(f"{r['model']:8} {r['history']:>8} {r['long_len']:>8} {r['batch_size']:>6} "
                     f"{r['step_ms']:>9.1f} {r['samples_per_s']:>11,.1f}")
    by = {(r["model"], r["history"]): r["samples_per_s"] for r in res["lengths"]}
    for n in sorted({r["history"] for r in res["lengths"]}):
        lines.append(f"TWIN-V2 / TWIN at {n}: {by[('twinv2', n)] / by[('twin', n)]:.2f}x")
    lines += ["", "end to end (`twinv2 train`; old: reference batches, no prefetch; new: fast batches + prefetch)",
              f"{'model':8} {'epochs':>6} {'old samples/s':>14} {'new samples/s':>14} {'x':>6} {'old wall s':>11} "
              f"{'new wall s':>11} {'same GAUC':>9}"]
    for m, r in res["end_to_end"].items():
        lines.append(f"{m:8} {r['epochs']:>6} {r['old']['train_samples_per_s']:>14,.0f} "
                     f"{r['new']['train_samples_per_s']:>14,.0f} {r['speedup']:>6.2f} {r['old']['wall_s']:>11.1f} "
                     f"{r['new']['wall_s']:>11.1f} {str(r['same_valid_gauc']):>9}")
        if "compiled" in r:
            c = r["compiled"]
            lines.append(f"{'':8} {'':>6} new + train.compile: {c['train_samples_per_s']:,.0f} samples/s "
                         f"({r['compiled_speedup']:.2f}x new), wall {c['wall_s']:.1f} s "
                         f"({r['compiled_wall_ratio']:.2f}x), best valid GAUC {c['best_valid_gauc']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a validated, clustered world (default: build one under --work)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--work", default=None, help="folder for the built world and the runs (default: a temp dir)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="the tiny world, small model, few steps (CI)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1, help="old/new end-to-end pairs (medians)")
    ap.add_argument("--compile", action="store_true", help="also time each model step through torch.compile "
                    "(same init and batch; the compilation timed apart)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_train.json"))
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work) if a.work else Path(tmp)
        res = run(Path(a.data) if a.data else None, device, a.quick, work, a.preset, a.batch_sizes, a.lengths,
                  a.steps, a.epochs, a.reps, compile_=a.compile)
    res["command"] = "python -m bench.bench_train " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(a.out, res)
    text = table(res)
    Path(a.out).with_suffix(".txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
