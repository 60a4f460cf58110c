"""The training loop: Adam/AdamW on binary cross-entropy, bf16 autocast on CUDA (fp32 on CPU), early
stopping on validation GAUC, a checkpoint every epoch, and `resume` that continues to the same result.

    fit(model, train_loader, valid_loader, cfg, ckpt_dir)  ->  {"best_epoch", "best_valid", "history", ...}

The final weights are those of the best validation epoch.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from twinv2.metrics.ctr import auc, gauc, logloss
from twinv2.training.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from twinv2.training.ddp import DistInfo, barrier, unwrap
from twinv2.training.prefetch import prefetch
from twinv2.training.samples import to_device


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"          # adam | adamw
    epochs: int = 4
    patience: int = 2                # epochs without a better validation GAUC before stopping
    seed: int = 0
    grad_clip: float = 0.0           # 0: off
    log_every: int = 20              # steps between per-step metric callbacks
    progress: bool = True
    keep_checkpoints: int = 2        # newest epoch checkpoints kept (each is enough to resume); 0: all
    bias_lr: float | None = None     # learning rate of the scalar id-bias tables (item / author / user); None: lr
    user_bias_lr: float | None = None    # the user-bias table's own rate (~100 samples per row, not ~2); None: bias_lr
    prefetch: int = 2                # batches built ahead by a background thread (twinv2.training.prefetch); 0: off
    fast_batches: bool = True        # SampleSet's fast batch path (fastbatch); false: the reference assembly (the same
                                     # tensors up to one float32 ulp in the life counts)
    compile: bool = False            # the training forward through torch.compile (inductor); the first batch (its
                                     # input checks) and evaluation stay eager (bench_train --compile measures it)

    @classmethod
    def from_params(cls, p: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (p or {}).items() if k in known})


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over every parameter (call after the model is on its device). The fused kernel
    (one pass over each tensor, same update rule) is used where torch has one for the device: the dense
    Adam step over the item-embedding table is a fixed cost of every step, ~7x cheaper fused on CPU
    (bench/bench_models.py)."""
    if cfg.optimizer not in ("adam", "adamw"):
        raise ValueError(f"train.optimizer must be adam or adamw, got {cfg.optimizer!r}")
    params = list(model.parameters())
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # the scalar id biases: a row is updated only by the samples of its id (an item's ~2 per epoch, a user's ~100)
    rates = {}
    for names, lr in ((("item_bias.weight", "author_bias.weight"), cfg.bias_lr),
                      (("user_bias.weight",), cfg.user_bias_lr if cfg.user_bias_lr is not None else cfg.bias_lr)):
        if lr is not None and float(lr) <= 0:
            raise ValueError(f"train.bias_lr / train.user_bias_lr must be > 0 (or null), got {lr!r}")
        for n in names:
            rates[n] = float(cfg.lr if lr is None else lr)
    # names as the bare model has them (DDP wraps it as `module.`: the same parameters under a prefix)
    named = ((n[len("module."):] if n.startswith("module.") else n, p) for n, p in model.named_parameters())
    own = {n: p for n, p in named if n in rates and rates[n] != float(cfg.lr)}
    if not own:
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    ids = {id(p) for p in own.values()}
    groups = [{"params": [p for p in params if id(p) not in ids]}]
    groups += [{"params": [p], "lr": rates[n]} for n, p in own.items()]
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing (fp32) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict(model: torch.nn.Module, batches, device: torch.device) -> dict[str, np.ndarray]:
    """Scores of every sample of a loader: users, labels, logits and probabilities (in loader order)."""
    m = unwrap(model)
    was = m.training
    m.eval()
    out = {"user": [], "label": [], "logit": []}
    for batch in prefetch(batches, 2):             # batches built ahead by a thread, in order
        b = to_device(batch, device)
        with autocast(device):
            logit = m(b).float()
        out["user"].append(batch["user"].numpy())
        out["label"].append(batch["label"].numpy())
        out["logit"].append(logit.cpu().numpy())
    m.train(was)
    res = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in out.items()}
    res["prob"] = probability(res["logit"])
    return res


def probability(logit: np.ndarray) -> np.ndarray:
    """sigmoid(logit) in float64: the probabilities every scoring path reports."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logit, np.float64)))


def score(pred: dict[str, np.ndarray]) -> dict:
    """AUC / GAUC / logloss of a prediction dict."""
    g = gauc(pred["user"], pred["label"], pred["prob"])
    return {"auc": auc(pred["label"], pred["prob"]), "gauc": g["gauc"],
            "logloss": logloss(pred["label"], pred["prob"]) if len(pred["label"]) else None,
            "gauc_users": g["n_users"], "n": int(len(pred["label"]))}


def _better(value, best) -> bool:
    if value is None:
        return best is None
    return best is None or value > best


def fit(model: torch.nn.Module, train_loader, valid_loader, cfg: TrainConfig, ckpt_dir: str | Path,
        dist_info: DistInfo | None = None, resume: bool = False,
        on_step: Callable[[int, dict], None] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Train `model` (already on its device; DDP-wrapped when distributed) and return the report.

    train_loader.sampler must have set_epoch (samples.BatchOrder): the data order of an epoch depends
    only on (seed, epoch), so a resumed run sees exactly the batches the uninterrupted run saw."""
    info = dist_info or DistInfo()
    device = info.device
    net = unwrap(model)
    opt = make_optimizer(model, cfg)
    state = {"epoch": 0, "best_valid": None, "best_epoch": 0, "bad_epochs": 0, "history": [], "stopped": False,
             "step": 0}
    best_weights = copy.deepcopy(net.state_dict())
    torch.manual_seed(cfg.seed)
    if resume and (last := latest_checkpoint(ckpt_dir)) is not None:
        ck = load_checkpoint(last)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        best_weights = ck["best_model"]
        state = {k: ck[k] for k in state}
        torch.set_rng_state(ck["rng"])
    resumed_from = state["epoch"]
    for ld in (train_loader, valid_loader):
        if hasattr(getattr(ld, "dataset", None), "fast"):
            ld.dataset.fast = bool(cfg.fast_batches)
            ld.dataset.per_sample = bool(cfg.fast_batches)      # read every epoch: per-sample inputs once
    fwd = torch.compile(model) if cfg.compile else model     # recompiles once for a last, smaller batch
    t_start = time.perf_counter()
    n_seen = 0
    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"] + 1
        train_loader.sampler.set_epoch(epoch)
        model.train()
        t0, cnt = time.perf_counter(), 0
        tot_t = torch.zeros((), dtype=torch.float64, device=device)     # summed on the device: no per-step sync
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not (cfg.progress and info.is_main), leave=False, dynamic_ncols=True)
        every = max(cfg.log_every, 1)
        for b in prefetch(train_loader, cfg.prefetch, device):
            with autocast(device):
                logit = (model if getattr(net, "check_inputs", False) else fwd)(b)   # checked batch: eager
            loss = F.binary_cross_entropy_with_logits(logit.float(), b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss = loss.detach()
            if getattr(net, "check_inputs", False):     # the batch contract holds for the first batch:
                net.check_inputs = False                 # skip the per-batch index-range checks after it
            state["step"] += 1
            nb = len(b["label"])
            n_seen += nb * info.world
            tot_t += loss.double() * nb
            cnt += nb
            bar.update(1)
            if state["step"] % every == 0:          # the only host syncs of the epoch: every log_every steps
                sps = cnt * info.world / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{float(loss):.4f}", sps=f"{sps:,.0f}")
                if on_step and info.is_main:
                    on_step(state["step"], {"train_loss": float(loss), "samples_per_s": sps})
        bar.close()
        tot = float(tot_t)
        if not math.isfinite(tot):
            raise FloatingPointError(f"epoch {epoch}: the training loss is not finite; lower train.lr")
        valid = score(predict(model, valid_loader, device))
        rec = {"epoch": epoch, "train_loss": tot / max(cnt, 1), "samples_per_s": cnt * info.world /
               max(time.perf_counter() - t0, 1e-9), "valid_auc": valid["auc"], "valid_gauc": valid["gauc"],
               "valid_logloss": valid["logloss"]}
        state["history"].append(rec)
        if _better(valid["gauc"], state["best_valid"]):
            state.update(best_valid=valid["gauc"], best_epoch=epoch, bad_epochs=0)
            best_weights = copy.deepcopy(net.state_dict())
        else:
            state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= cfg.patience
        state["epoch"] = epoch
        if info.is_main:
            save_checkpoint(ckpt_dir, epoch, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                              "best_model": best_weights, "rng": torch.get_rng_state(), **state})
            prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
            if on_epoch:
                on_epoch(epoch, rec)
        barrier(info)
    net.load_state_dict(best_weights)
    wall = time.perf_counter() - t_start
    return {"best_epoch": state["best_epoch"], "best_valid_gauc": state["best_valid"], "epochs_run": state["epoch"],
            "early_stopped": state["stopped"], "history": state["history"], "steps": state["step"],
            "resumed_from_epoch": resumed_from, "wall_s": wall,
            "samples_per_s": n_seen / wall if wall > 0 and n_seen else None}
