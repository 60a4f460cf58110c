"""`twinv2 train --data DIR --model NAME --out RUNDIR [--resume] [--warm-start CKPT]`.

Reads DIR/validated/ (and the CURRENT cluster version for models whose long part is clusters), trains
on the train split with early stopping on validation GAUC, and writes RUNDIR/:

    config.json            model, params, data, cluster version, vocabulary sizes, device
    vocab.npz              the exact vocabulary (evaluation and serving rebuild batches with it)
    checkpoints/epoch-NNNN.pt   one per epoch (atomic; the newest train.keep_checkpoints kept), --resume continues from the last
    model.pt               best weights (state dict; torch.load(weights_only=True))
    item_embeddings.npz    item_id (N,), emb (N, d), version  -> `twinv2 cluster --embeddings RUNDIR`
    train_metrics.json     the report

Under torchrun (WORLD_SIZE > 1) every rank trains on its share of the batches (DDP) and rank 0 writes.
MLflow (pipelines.train_tracking, shared with the gbdt stage): logs into the active run, or the run
MLFLOW_RUN_ID names, or its own run when MLFLOW_TRACKING_URI or TWINV2_MLFLOW=1 is set (the DVC stages; the
default store then); nothing otherwise. Own and bound runs log system metrics (CPU, memory; GPU where present)
and the validated data as a dataset input.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from twinv2.config import load_params
from twinv2.io import atomic_path, read_json, write_json
from twinv2.training import ddp
from twinv2.training.checkpoint import load_checkpoint, state_hash
from twinv2.training.loop import TrainConfig, fit
from twinv2.training.samples import loader
from twinv2.training.world import load_world

from pipelines.train_tracking import save_state_dict, training_run


def build(name: str, vocab, params: dict):
    from twinv2.models import build_model

    return build_model(name, vocab.sizes(), params)


def _warm_start(model: torch.nn.Module, path: str | Path) -> dict:
    """Initialise from a checkpoint, a model.pt, or a run directory holding one; only matching shapes."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.exists():
        raise FileNotFoundError(f"--warm-start {path}: no such checkpoint or run directory with model.pt")
    sd = load_checkpoint(p)
    sd = sd.get("best_model", sd.get("model", sd)) if isinstance(sd, dict) and ("model" in sd) else sd
    own = model.state_dict()
    ok = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(ok, strict=False)
    return {"warm_start": str(p), "loaded": len(ok), "of": len(own)}


def init_item_embeddings(model: torch.nn.Module, world) -> dict:
    """Start the item-id table from the item embedding of the cluster version (docs/models.md, item_init):
    rows of the vocabulary's items, rescaled so the table keeps its init std; padding stays 0."""
    emb = world.item_embedding()
    if emb is None:        # recorded in config.json (warm_start), not silent
        return {"item_init": "random", "reason": f"{world.data}/clusters has no version with embeddings.npz"}
    table = model.features.item.weight                                         # (N + 2, d)
    d = table.shape[1]
    vecs = torch.from_numpy(emb.lookup(world.vocab.item_ids))                  # (N, d_c), unit rows
    vecs = vecs[:, :d]              # d < d_c: the leading components (the bootstrap is an SVD, ordered)
    std = float(table[1:].detach().std())
    n = len(world.vocab.item_ids)
    with torch.no_grad():
        table[1:n + 1, :vecs.shape[1]] = vecs * (std / float(vecs.std()))   # d > d_c: the rest stays random
    return {"item_init": "cooc", "embedding_version": emb.version, "rows": n, "dims": int(vecs.shape[1])}


def freeze_tables(model: torch.nn.Module, tables) -> None:
    """Keep the named item-inherent id tables (model.frozen_tables) at their initial values."""
    from twinv2.models.layers import INHERENT

    for table in tables:
        if table not in INHERENT:
            raise ValueError(f"model.frozen_tables: {table!r} is not an id table; expected some of {list(INHERENT)}")
        getattr(model.features, table).weight.requires_grad_(False)


def run(data: str | Path, model: str, out: str | Path, params: dict | None = None, resume: bool = False,
        warm_start: str | Path | None = None) -> dict:
    params = params or load_params()
    from twinv2.models import TRAINABLE
    if model not in TRAINABLE:
        raise ValueError(f"--model {model!r} is not a model; expected one of {list(TRAINABLE)}")
    if model == "gbdt":                 # boosted trees over life-cycle statistics: no torch model, no DDP
        from pipelines import train_gbdt
        return train_gbdt.run(data, out, params, resume=resume, warm_start=warm_start)
    tp = dict(params.get("train", {}))
    cfg = TrainConfig.from_params(tp)
    out = Path(out)
    info = ddp.setup(tp.get("device"))
    try:
        with ddp.guard(info, out / "checkpoints"):      # a lost peer: PeerLost naming the checkpoint to resume
            return _run(data, model, out, params, tp, cfg, info, resume, warm_start)
    finally:
        ddp.cleanup(info)


def _run(data, name, out: Path, params, tp, cfg: TrainConfig, info, resume, warm_start) -> dict:
    torch.manual_seed(cfg.seed)
    from twinv2.models import MODEL_NAMES, REGISTRY

    if name not in MODEL_NAMES:
        raise ValueError(f"--model {name!r} is not a model; expected one of {list(MODEL_NAMES)}")
    need_clusters = getattr(REGISTRY[name], "long_source", "raw") == "clusters"
    if resume and not (out / "checkpoints").is_dir():
        raise FileNotFoundError(f"--resume: {out / 'checkpoints'} not found; nothing to resume from")
    t0 = time.perf_counter()
    world = load_world(data, need_clusters=need_clusters, cluster_version=tp.get("cluster_version"),
                       features=tp.get("features"))
    model = build(name, world.vocab, params)
    warm = _warm_start(model, warm_start) if warm_start else None
    if warm is None and params.get("model", {}).get("item_init", "random") == "cooc":
        warm = init_item_embeddings(model, world)
    freeze_tables(model, params.get("model", {}).get("frozen_tables") or ())
    torch.manual_seed(cfg.seed)
    model = model.to(info.device)
    tr, va = world.samples("train"), world.samples("valid")
    if len(tr) == 0:
        raise ValueError(f"{data}: the validated impressions hold no 'train' rows; expected split train/valid/test")
    bs = int(tp.get("batch_size", 256))
    nw = int(tp.get("num_workers", 0))
    train_loader = loader(world.dataset(tr, model), bs, shuffle=True, seed=cfg.seed, num_workers=nw,
                          rank=info.rank, world=info.world)
    valid_loader = loader(world.dataset(va, model), int(tp.get("eval_batch_size", 1024)), shuffle=False,
                          num_workers=nw)
    config = {"model": name, "data": str(Path(data).resolve()), "params": {"model": params.get("model", {}),
              "train": tp}, "long_source": model.long_source, "long_len": model.long_len,
              "short_len": model.short_len, "vocab": world.vocab.sizes(), "cluster_version": world.cluster_version,
              "watermark": world.watermark, "n_train": len(tr), "n_valid": len(va), "device": str(info.device),
              "sample_floor": world.sample_floor, "excluded_before_watermark": world.excluded or {},
              "world_size": info.world, "warm_start": warm, "data_source": world.meta.get("source")}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume and (out / "config.json").exists():
            old = read_json(out / "config.json")
            if old.get("model") != name:
                raise ValueError(f"--resume: {out} holds a {old.get('model')!r} run, not {name!r}")
        write_json(out / "config.json", config)
        world.vocab.save(out / "vocab.npz")
    net = ddp.wrap(model, info)
    with training_run(out, config, params, info.is_main) as ml:
        report = fit(net, train_loader, valid_loader, cfg, out / "checkpoints", info, resume=resume,
                     on_step=ml.step, on_epoch=ml.epoch)
        model = ddp.unwrap(net)
        report.update(model=name, n_train=len(tr), n_valid=len(va), world_size=info.world, device=str(info.device),
                      excluded_before_watermark=world.excluded or {},
                      cluster_version=world.cluster_version, total_wall_s=time.perf_counter() - t0)
        if info.is_main:
            sd = model.state_dict()
            save_state_dict(out / "model.pt", sd)
            version = f"{out.name}-{state_hash(sd)}"
            emb = model.item_embedding_table().numpy()
            n = len(world.vocab.item_ids)
            with atomic_path(out / "item_embeddings.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, item_id=world.vocab.item_ids.astype(np.int64),
                             emb=emb[1:n + 1].astype(np.float32), version=np.array(version))
            report["embedding_version"] = version
            best = report["best_valid_gauc"]
            report["summary"] = (f"trained {name} on {len(tr):,} samples: {report['epochs_run']} epochs, best valid "
                                 f"GAUC {best if best is None else round(best, 4)} (epoch {report['best_epoch']}), "
                                 f"{report['total_wall_s']:.1f}s -> {out}")
            write_json(out / "train_metrics.json", report)
            ml.finish(report, model, world)
    return report
