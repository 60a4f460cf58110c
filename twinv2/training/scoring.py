"""Scoring with a trained run: (user, candidate items[, ts]) -> probability, read from the stored history
and clusters of the dataset. Used by evaluation (test split, diversity pools) and by the MLflow model.

    s = RunScorer(RUNDIR)                 # data: the directory the run was trained on, unless given
    p = s.score(users, items, ts=None)    # ts None: the end of the dataset (meta end_ms)
    p = s.score_user(user, items, ts)     # one user against many candidates (the serving path)
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
    """(model in eval mode, config, vocab) of a run directory (a gbdt run: its GBDTModel)."""
    from twinv2.models import build_model

    run = Path(run)
    for f in ("config.json", "vocab.npz", "model.pt"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f} not found: expected a run directory written by `twinv2 train`")
    config = read_json(run / "config.json")
    vocab = Vocab.load(run / "vocab.npz")
    if config.get("model") == "gbdt":          # boosted trees (arrays in model.pt), scored on the CPU
        from twinv2.models.gbdt import FEATURE_NAMES, GBDTModel

        return GBDTModel.from_state(load_checkpoint(run / "model.pt"), config.get("feature_names", FEATURE_NAMES)), \
            config, vocab
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
        if not isinstance(self.model, torch.nn.Module):      # gbdt: features of the samples, then the trees
            return self.model.predict_samples(self.world, s)
        return predict(self.model, loader(self.world.dataset(s, self.model), self.batch_size, shuffle=False),
                       self.device)

    @torch.no_grad()
    def score_user(self, user: int, items, ts=None) -> np.ndarray:
        """Probabilities of one user for many candidate items at one time ts (default: default_ts()).

        The user's short and long sequences are built once and broadcast over the candidates (stride 0),
        so TWIN / TWIN-V2 project them once and gather the top-k projections (their serving path), and
        nothing is copied per candidate. Same scores as predict_frame on the same rows (tested)."""
        from twinv2.training.loop import autocast, probability
        from twinv2.training.samples import to_device

        items = np.asarray(items, np.int64)
        n = len(items)
        if n == 0:
            return np.zeros(0, np.float64)
        t = self.default_ts() if ts is None else int(ts)
        df = pd.DataFrame({"user_id": np.full(n, int(user), np.int64), "item_id": items, "ts": t, "label": 0})
        if not isinstance(self.model, torch.nn.Module):      # gbdt: per-row features are already vectorised
            return self.predict_frame(df)["prob"]
        ds = self.world.dataset(self.world.samples(None, df), self.model)
        one = to_device(ds[[0]], self.device)                  # the user's sequences, built once
        batch = {"target": to_device(ds.targets(np.arange(n)), self.device),
                 "long": {k: x.expand(n, *x.shape[1:]) for k, x in one["long"].items()},
                 "short": {k: x.expand(n, *x.shape[1:]) for k, x in one["short"].items()},
                 "user": torch.full((n,), int(user), dtype=torch.int64, device=self.device)}
        if ds.life is not None:                                # virtual_mix: life-cycle counts per candidate
            batch["life"] = ds.life_counts(np.arange(n)).to(self.device)
        with autocast(self.device):
            return probability(self.model(batch).float().cpu().numpy())

    def score_frame(self, df: pd.DataFrame) -> np.ndarray:
        """Probabilities of the rows of df (user_id, item_id[, ts]) in row order: one user at one time (a
        serving request) takes score_user, anything else predict_frame."""
        one_ts = "ts" not in df.columns or df["ts"].nunique() <= 1
        if len(df) > 1 and df["user_id"].nunique() == 1 and one_ts:
            ts = int(df["ts"].iloc[0]) if "ts" in df.columns else None
            return self.score_user(int(df["user_id"].iloc[0]), df["item_id"].to_numpy(np.int64), ts)
        return self.predict_frame(df)["prob"]

    def score(self, users, items, ts=None) -> np.ndarray:
        df = pd.DataFrame({"user_id": np.asarray(users, np.int64), "item_id": np.asarray(items, np.int64)})
        if ts is not None:
            df["ts"] = np.broadcast_to(np.asarray(ts, np.int64), len(df))
        return self.predict_frame(df)["prob"]
