"""How fast does a model learn to match the target against its history? A diagnostic benchmark.

    python bench/bench_learn_presence.py [--models twin din] [--init-std 0.1 0.5] [--steps 600]

Task: each sample has a long sequence of L = 30 random items (46 categories) and a random target item;
label = 1 iff some item of the sequence has the target's category (about half the samples). It is the
smallest form of what life-cycle models must learn: "has this user watched this kind of thing before".
Each configuration trains from scratch (Adam, batch 128) on fresh random batches and reports the AUC
on 4,000 held-out samples after every `--every` steps. Prints a table and JSON; writes
bench/results/bench_learn_presence.json. CPU, a few seconds per configuration.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twinv2.io import write_json  # noqa: E402
from twinv2.models import build_model  # noqa: E402
from twinv2.training.loop import TrainConfig, make_optimizer  # noqa: E402

VOCAB = {"item": 2001, "author": 201, "category": 47, "dur_bucket": 8, "cross": [12, 12, 24]}
BASE = {"embed_dim": 16, "side_dim": 8, "cross_dim": 4, "n_heads": 2, "head_dim": 8, "topk": 16,
        "short_len": 8, "twin_window": 30, "twin_full_len": 100, "din_len": 30, "din_att_mlp": [16],
        "mlp": [32], "sim_soft_dim": 8, "eta_bits": 16, "sdim_hashes": 3, "sdim_width": 2, "hash_seed": 0}


class Task:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.cat = torch.randint(1, VOCAB["category"], (VOCAB["item"],), generator=self.g)
        self.author = torch.randint(1, VOCAB["author"], (VOCAB["item"],), generator=self.g)

    def seq(self, B: int, L: int) -> dict:
        g, it = self.g, torch.randint(1, VOCAB["item"], (B, L), generator=self.g)
        return {"item": it, "author": self.author[it], "category": self.cat[it],
                "dur_bucket": torch.randint(1, VOCAB["dur_bucket"], (B, L), generator=g),
                "cross": torch.stack([torch.randint(1, n, (B, L), generator=g) for n in VOCAB["cross"]], -1),
                "mask": torch.ones(B, L, dtype=torch.bool), "log_n": torch.zeros(B, L)}

    def batch(self, B: int) -> dict:
        long, short = self.seq(B, BASE["twin_window"]), self.seq(B, BASE["short_len"])
        t = torch.randint(1, VOCAB["item"], (B,), generator=self.g)
        target = {"item": t, "author": self.author[t], "category": self.cat[t],
                  "dur_bucket": torch.randint(1, VOCAB["dur_bucket"], (B,), generator=self.g)}
        label = (long["category"] == target["category"][:, None]).any(1).float()
        return {"target": target, "long": long, "short": short, "label": label, "user": torch.arange(B)}


def run_one(model: str, init_std: float, steps: int, every: int, lr: float, seed: int, extra: dict) -> dict:
    torch.manual_seed(seed)
    task = Task(seed)
    m = build_model(model, VOCAB, {**BASE, **extra, "embed_init_std": init_std})
    m.check_inputs = False
    opt = make_optimizer(m, TrainConfig(lr=lr))
    test = task.batch(4000)
    curve = []
    for step in range(1, steps + 1):
        b = task.batch(128)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(b), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                curve.append({"samples": step * 128, "auc": float(roc_auc_score(test["label"], m(test)))})
    return {"model": model, "init_std": init_std, "lr": lr, "extra": extra, "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["twin", "din"])
    ap.add_argument("--init-std", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", default="{}", help="JSON overrides of the model params, e.g. '{\"mlp\": [64, 32]}'")
    a = ap.parse_args()
    torch.set_num_threads(1)
    extra = json.loads(a.set)
    rows = [run_one(m, s, a.steps, a.every, a.lr, a.seed, extra) for m in a.models for s in a.init_std]
    out = {"task": "label = target category present in 30 random items", "rows": rows}
    write_json(ROOT / "bench" / "results" / "bench_learn_presence.json", out)
    print(json.dumps(out))
    marks = [c["samples"] for c in rows[0]["curve"]]
    print(f"\n{'model':8} {'init std':>8} " + " ".join(f"{'AUC@' + str(s // 1000) + 'k':>9}" for s in marks))
    for r in rows:
        print(f"{r['model']:8} {r['init_std']:>8} " + " ".join(f"{c['auc']:>9.3f}" for c in r["curve"]))


if __name__ == "__main__":
    main()
