"""Scoring with a trained run: (user, candidate items[, ts]) -> probability, read from the stored history
and clusters of the dataset. Used by evaluation (test split, diversity pools) and by the MLflow model.

    s = RunScorer(RUNDIR)                 # data: the directory the run was trained on, unless given
    p = s.score(users, items, ts=None)    # ts None: the end of the dataset (meta end_ms)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twinv2.io import read_json
from twinv2.training.checkpoint import load_checkpoint
from twinv2.training.loop import predict
from twinv2.training.samples import Vocab, loader
from twinv2.training.world import World, load_world


def load_run_model(run: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, config, vocab) of a run directory."""
    from twinv2.models import build_model

    run = Path(run)
    for f in ("config.json", "vocab.npz", "model.pt"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f} not found: expected a run directory written by `twinv2 train`")
    config = read_json(run / "config.json")
    vocab = Vocab.load(run / "vocab.npz")
    model = build_model(config["model"], vocab.sizes(), config["params"])
    model.load_state_dict(load_checkpoint(run / "model.pt"))
    return model.to(device).eval(), config, vocab


class RunScorer:
    def __init__(self, run: str | Path, data: str | Path | None = None, world: World | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 1024):
        self.model, self.config, vocab = load_run_model(run, device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.world = world or load_world(data or self.config["data"], need_clusters=self.model.long_source == "clusters",
                                         cluster_version=self.config.get("cluster_version"), vocab=vocab)

    def default_ts(self) -> int:
        end = self.world.meta.get("end_ms")
        if end is not None:
            return int(end)
        ts = self.world.hist.cols["ts"]
        return int(ts.max()) + 1 if len(ts) else 0

    def predict_frame(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """Scores of the rows of df (user_id, item_id[, ts][, label]) in row order."""
        df = df.reset_index(drop=True).copy()
        if "ts" not in df.columns:
            df["ts"] = self.default_ts()
        if "label" not in df.columns:
            df["label"] = 0
        s = self.world.samples(None, df)
        return predict(self.model, loader(self.world.dataset(s, self.model), self.batch_size, shuffle=False),
                       self.device)

    def score(self, users, items, ts=None) -> np.ndarray:
        df = pd.DataFrame({"user_id": np.asarray(users, np.int64), "item_id": np.asarray(items, np.int64)})
        if ts is not None:
            df["ts"] = np.broadcast_to(np.asarray(ts, np.int64), len(df))
        return self.predict_frame(df)["prob"]
