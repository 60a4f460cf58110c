"""`gbdt`: scikit-learn's HistGradientBoostingClassifier over life-cycle statistics of each impression.

The first anchor a practitioner checks: no sequence model, only counts. Every feature of a sample
(user u, position p, ts t, target item i, category c, author a) is computed from

    H      the user's behaviours strictly before t (the first p rows of u in the CSR store: the same
           leakage rule as every other model, docs/training.md), and
    G(t)   all users' behaviours with ts strictly before t (global popularity: never a later behaviour),

plus the target item's own attributes (items table). The formulas are in FEATURES below and in
docs/models.md ("gbdt"). They are computed vectorised with no per-sample copy of the history: rows
sorted by (group, order key) and two `searchsorted` per query give the count (and, with cumulative sums,
the weighted sum) of a group's rows inside any order-key range -- a user's prefix [lo, lo + p) when the
order key is the CSR row, or G(t) when it is the rank of ts. `reference_features` is the plain
per-sample loop the tests hold it to.

The fitted model is kept as arrays (`to_state` / `GBDTModel.from_state`): the trees' split features,
thresholds, missing-value directions, children and leaf values, saved as a dict of tensors in RUNDIR/model.pt
that loads with `torch.load(weights_only=True)` (no pickle), and scored by `predict_raw`, which walks the trees
exactly as scikit-learn's predictor does (tested equal).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DEFAULTS = {
    "max_iter": 200,            # boosting iterations (trees)
    "learning_rate": 0.05,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 20,
    "l2_regularization": 0.0,
    "max_bins": 255,
    "max_features": 1.0,        # share of features drawn per split (< 1: train.seed changes the trees)
    "early_stopping": True,     # HistGradientBoosting's own stopping on the valid split's loss
    "n_iter_no_change": 20,
    "select_on_valid": True,    # keep the prefix of trees with the best valid GAUC (as epochs are chosen)
    "recent_n": 50,             # H_n: the last n behaviours of H
    "recent_frac": 0.1,         # H_f: the last max(1, ceil(f * p)) behaviours of H
    "user_feedback": False,     # + FEEDBACK_FEATURES: the user's earlier train labels (twinv2.training.feedback)
}

# name: formula (w_b = min(play_ms / max(duration_ms, 1), 1), the completion weight of a behaviour;
# "NaN" = missing, which HistGradientBoosting routes natively)
FEATURES = {
    "log_hist_len": "ln(1 + p), p = |H|",
    "cat_count_log": "ln(1 + #{b in H: cat_b = c})",
    "cat_share": "#{b in H: cat_b = c} / p (NaN if p = 0)",
    "cat_count_frac_log": "ln(1 + #{b in H_f: cat_b = c})",
    "cat_share_frac": "#{b in H_f: cat_b = c} / |H_f| (NaN if p = 0)",
    "cat_count_recent_log": "ln(1 + #{b in H_n: cat_b = c})",
    "cat_share_recent": "#{b in H_n: cat_b = c} / |H_n| (NaN if p = 0)",
    "cat_lift": "cat_share / cat_pop (NaN if either is NaN or cat_pop = 0)",
    "cat_completion_share": "sum_{b in H, cat_b = c} w_b / sum_{b in H} w_b (NaN if the denominator is 0)",
    "cat_mean_completion": "mean of w_b over b in H with cat_b = c (NaN if none)",
    "cat_gap_log": "ln(1 + (t - ts of the last b in H with cat_b = c) / 1000) (NaN if none)",
    "author_count_log": "ln(1 + #{b in H: author_b = a})",
    "author_share": "#{b in H: author_b = a} / p (NaN if p = 0)",
    "item_count_log": "ln(1 + #{b in H: item_b = i}) (> 0: ever watched)",
    "item_gap_log": "ln(1 + (t - ts of the last b in H with item_b = i) / 1000) (NaN if never)",
    "item_recent": "1 if i is among the items of H_n, else 0",
    "user_gap_log": "ln(1 + (t - ts of the last b in H) / 1000) (NaN if p = 0)",
    "user_mean_completion": "mean of w_b over H (NaN if p = 0)",
    "item_pop_log": "ln(1 + #{b in G(t): item_b = i})",
    "item_completion_global": "mean of w_b over b in G(t) with item_b = i (NaN if none)",
    "author_pop_log": "ln(1 + #{b in G(t): author_b = a})",
    "cat_pop": "#{b in G(t): cat_b = c} / |G(t)| (NaN if G(t) is empty)",
    "log_duration": "ln(target duration_ms / 1000) from the items table (NaN if unknown or <= 0)",
}
FEATURE_NAMES = tuple(FEATURES)
# gbdt.user_feedback: the user's labelled train impressions strictly before t (never its own or an evaluation label)
FEEDBACK_FEATURES = {
    "user_feedback_count_log": "ln(1 + n), n = #{train impressions of the user with ts < t}",
    "user_feedback_rate": "k / n, k = how many of them have label 1 (NaN if n = 0)",
}


def feature_names(user_feedback: bool = False) -> tuple:
    """The feature columns of a gbdt run: FEATURE_NAMES, then FEEDBACK_FEATURES with gbdt.user_feedback."""
    return FEATURE_NAMES + (tuple(FEEDBACK_FEATURES) if user_feedback else ())


def gbdt_params(params: dict | None) -> dict:
    """The `gbdt:` section of params.yaml over DEFAULTS (accepts the whole params dict or the section)."""
    p = params or {}
    whole = isinstance(p, dict) and any(k in p for k in ("gbdt", "train", "model"))
    sec = (p.get("gbdt") or {}) if whole else p
    if not isinstance(sec, dict):
        raise ValueError(f"params.yaml section 'gbdt' must be a mapping, got {type(sec).__name__}")
    unknown = sorted(k for k in sec if k not in DEFAULTS)
    if unknown:
        raise ValueError(f"params.yaml section 'gbdt' has unknown keys {unknown}; expected some of {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in sec.items() if k in DEFAULTS}}
    if int(out["recent_n"]) < 1 or not 0.0 < float(out["recent_frac"]) <= 1.0:
        raise ValueError(f"params.yaml gbdt.recent_n must be >= 1 and gbdt.recent_frac in (0, 1]; got "
                         f"{out['recent_n']} and {out['recent_frac']}")
    return out


# ------------------------------------------------------------------------------------------- features


class _RangeIndex:
    """Rows sorted by (group, order key): count / weighted sum / last order key of a group's rows with
    order key in [lo, hi), for many queries at once (two searchsorted each)."""

    def __init__(self, group: np.ndarray, order: np.ndarray, weights: np.ndarray | None = None):
        group = np.asarray(group, np.int64)
        order = np.asarray(order, np.int64)
        self.m = int(order.max()) + 2 if len(order) else 1           # every query bound hi <= max + 1 < m
        key = group * self.m + order
        srt = np.argsort(key, kind="stable")
        self.key, self.order = key[srt], order[srt]
        self.cum = None if weights is None else np.concatenate([[0.0], np.cumsum(np.asarray(weights, np.float64)[srt])])

    def _at(self, g, o):
        return np.searchsorted(self.key, np.asarray(g, np.int64) * self.m + np.minimum(o, self.m - 1), side="left")

    def bounds(self, g, lo, hi):
        return self._at(g, lo), self._at(g, hi)

    def count(self, g, lo, hi) -> np.ndarray:
        a, b = self.bounds(g, lo, hi)
        return b - a

    def wsum(self, g, lo, hi) -> np.ndarray:
        a, b = self.bounds(g, lo, hi)
        return self.cum[b] - self.cum[a]

    def last(self, g, lo, hi) -> np.ndarray:
        """The largest order key of the group's rows in [lo, hi), -1 if none."""
        a, b = self.bounds(g, lo, hi)
        return np.where(b > a, self.order[np.maximum(b - 1, 0)], -1)


def _div(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _gap_log(t, ts_last, ok):
    return np.where(ok, np.log1p(np.maximum(np.asarray(t, np.float64) - ts_last, 0.0) / 1000.0), np.nan)


class Featurizer:
    """Life-cycle statistics of samples from the CSR behaviour store, built once per world.

    hist: UserHistories (columns ts, play_ms, duration_ms); item, author, category: per-row vocabulary
    indices (RowFeatures of the raw store); vocab: the run's Vocab (target attributes)."""

    def __init__(self, hist, item: np.ndarray, author: np.ndarray, category: np.ndarray, vocab,
                 recent_n: int = 50, recent_frac: float = 0.1, user_feedback: bool = False):
        self.hist, self.vocab = hist, vocab
        self.user_feedback = bool(user_feedback)
        self.names = feature_names(self.user_feedback)
        self.recent_n, self.recent_frac = int(recent_n), float(recent_frac)
        ts = np.asarray(hist.cols["ts"], np.int64)
        n = len(ts)
        self.ts = np.append(ts, 0)                                        # padded: lookups of "none" stay in range
        comp = np.asarray(hist.cols["play_ms"], np.float64) / np.maximum(np.asarray(hist.cols["duration_ms"], np.float64), 1.0)
        w = np.clip(np.nan_to_num(comp, nan=0.0), 0.0, 1.0)
        self.cw = np.concatenate([[0.0], np.cumsum(w)])                   # completion weight prefix sums by row
        rows = np.arange(n, dtype=np.int64)
        self.by_cat = _RangeIndex(category, rows, w)                       # per-user ranges: order = CSR row
        self.by_author = _RangeIndex(author, rows)
        self.by_item = _RangeIndex(item, rows)
        self.uts = np.unique(ts)                                           # global: order = rank of ts
        self.sorted_ts = np.sort(ts)
        rank = np.searchsorted(self.uts, ts, side="left")
        self.g_cat = _RangeIndex(category, rank)
        self.g_author = _RangeIndex(author, rank)
        self.g_item = _RangeIndex(item, rank, w)

    @classmethod
    def from_world(cls, world, recent_n: int = 50, recent_frac: float = 0.1, user_feedback: bool = False) -> "Featurizer":
        return cls(world.hist, world.raw.item, world.raw.author, world.raw.category, world.vocab, recent_n, recent_frac,
                   user_feedback)

    def __call__(self, samples) -> np.ndarray:
        """(M, len(self.names)) float64 features of Samples (user index, position, ts, target item[, fb_n, fb_k])."""
        v, h = self.vocab, self.hist
        ok_u = samples.uidx >= 0
        lo = np.where(ok_u, h.offsets[np.where(ok_u, samples.uidx, 0)], 0).astype(np.int64) if len(h.offsets) > 1 \
            else np.zeros(len(samples), np.int64)
        p = np.where(ok_u, samples.pos, 0).astype(np.int64)
        hi = lo + p
        t = np.asarray(samples.ts, np.int64)
        i = np.asarray(samples.item, np.int64)
        c, a = v.item_category[i], v.item_author[i]
        pf = p.astype(np.float64)
        lo_n = np.maximum(lo, hi - self.recent_n)
        nf = np.where(p > 0, np.maximum(1, np.ceil(self.recent_frac * pf)), 0).astype(np.int64)
        lo_f = hi - nf
        f = {}
        f["log_hist_len"] = np.log1p(pf)
        cc = self.by_cat.count(c, lo, hi)
        f["cat_count_log"] = np.log1p(cc)
        f["cat_share"] = _div(cc, p)
        cf = self.by_cat.count(c, lo_f, hi)
        f["cat_count_frac_log"] = np.log1p(cf)
        f["cat_share_frac"] = _div(cf, nf)
        cn = self.by_cat.count(c, lo_n, hi)
        f["cat_count_recent_log"] = np.log1p(cn)
        f["cat_share_recent"] = _div(cn, hi - lo_n)
        g = np.searchsorted(self.uts, t, side="left")                     # G(t) = rows of ts rank < g
        n_g = np.searchsorted(self.sorted_ts, t, side="left")              # |G(t)|
        cat_pop = _div(self.g_cat.count(c, 0, g), n_g)
        f["cat_lift"] = _div(f["cat_share"], cat_pop)
        cw = self.by_cat.wsum(c, lo, hi)
        f["cat_completion_share"] = _div(cw, self.cw[hi] - self.cw[lo])
        f["cat_mean_completion"] = _div(cw, cc)
        last = self.by_cat.last(c, lo, hi)
        f["cat_gap_log"] = _gap_log(t, self.ts[np.maximum(last, 0)], last >= 0)
        ac = self.by_author.count(a, lo, hi)
        f["author_count_log"] = np.log1p(ac)
        f["author_share"] = _div(ac, p)
        f["item_count_log"] = np.log1p(self.by_item.count(i, lo, hi))
        last = self.by_item.last(i, lo, hi)
        f["item_gap_log"] = _gap_log(t, self.ts[np.maximum(last, 0)], last >= 0)
        f["item_recent"] = (self.by_item.count(i, lo_n, hi) > 0).astype(np.float64)
        f["user_gap_log"] = _gap_log(t, self.ts[np.maximum(hi - 1, 0)], p > 0)
        f["user_mean_completion"] = _div(self.cw[hi] - self.cw[lo], p)
        ic = self.g_item.count(i, 0, g)
        f["item_pop_log"] = np.log1p(ic)
        f["item_completion_global"] = _div(self.g_item.wsum(i, 0, g), ic)
        f["author_pop_log"] = np.log1p(self.g_author.count(a, 0, g))
        f["cat_pop"] = cat_pop
        dur = v.item_duration_ms[i] / 1000.0
        with np.errstate(divide="ignore", invalid="ignore"):
            f["log_duration"] = np.where(dur > 0, np.log(np.where(dur > 0, dur, 1.0)), np.nan)
        if self.user_feedback:
            if samples.fb_n is None:
                raise ValueError("gbdt.user_feedback needs the samples' earlier train labels (Samples.fb_n / fb_k, "
                                 "filled by World.samples)")
            f["user_feedback_count_log"] = np.log1p(samples.fb_n)
            f["user_feedback_rate"] = _div(samples.fb_k, samples.fb_n)
        X = np.stack([np.asarray(f[k], np.float64) for k in self.names], axis=1) if len(samples) else \
            np.zeros((0, len(self.names)))
        X[~np.isfinite(X)] = np.nan
        return X


def reference_features(behaviors: pd.DataFrame, items: pd.DataFrame, impressions: pd.DataFrame,
                       recent_n: int = 50, recent_frac: float = 0.1, feedback: pd.DataFrame | None = None) -> np.ndarray:
    """The same features by a plain per-sample loop over raw ids (no store, no vocabulary, no index):
    behaviours (user_id, item_id, ts, play_ms, duration_ms), items (item_id, author_id, category,
    duration_ms), impressions (user_id, item_id, ts); with feedback (the labelled impressions: user_id, ts,
    label, split) the FEEDBACK_FEATURES follow. For tests; O(samples x behaviours)."""
    import math

    meta = items.drop_duplicates("item_id").set_index("item_id")
    author = meta["author_id"].to_dict()
    cat = meta["category"].to_dict()
    idur = meta["duration_ms"].to_dict()
    b = behaviors.sort_values(["user_id", "ts"], kind="stable")
    b_item = b["item_id"].to_numpy()
    b_cat = np.array([cat.get(x, -1) for x in b_item])
    b_auth = np.array([author.get(x, -1) for x in b_item])
    b_ts = b["ts"].to_numpy(np.int64)
    b_w = np.clip(b["play_ms"].to_numpy(np.float64) / np.maximum(b["duration_ms"].to_numpy(np.float64), 1.0), 0, 1)
    b_user = b["user_id"].to_numpy()
    nan = float("nan")
    rows = []
    for u, it, t in zip(impressions["user_id"], impressions["item_id"], impressions["ts"]):
        mine = np.flatnonzero((b_user == u) & (b_ts < t))                  # H, in time order
        p = len(mine)
        c, a = cat.get(it, -1), author.get(it, -1)
        hc, ha, hi_, hts, hw = b_cat[mine], b_auth[mine], b_item[mine], b_ts[mine], b_w[mine]
        nf = max(1, math.ceil(recent_frac * p)) if p else 0
        recent = slice(max(0, p - recent_n), p)
        frac = slice(p - nf, p)
        glob = b_ts < t
        cc = int(np.sum(hc == c))
        cf = int(np.sum(hc[frac] == c))
        cn = int(np.sum(hc[recent] == c))
        share = cc / p if p else nan
        n_g = int(glob.sum())
        cat_pop = (int(np.sum(glob & (b_cat == c))) / n_g) if n_g else nan
        cw = float(np.sum(hw[hc == c]))
        tw = float(np.sum(hw))
        last_c = hts[hc == c]
        last_i = hts[hi_ == it]
        g_it = glob & (b_item == it)
        d = idur.get(it, nan)
        row = {
            "log_hist_len": math.log1p(p), "cat_count_log": math.log1p(cc), "cat_share": share,
            "cat_count_frac_log": math.log1p(cf), "cat_share_frac": cf / nf if nf else nan,
            "cat_count_recent_log": math.log1p(cn), "cat_share_recent": cn / min(p, recent_n) if p else nan,
            "cat_lift": share / cat_pop if (p and n_g and cat_pop > 0) else nan,
            "cat_completion_share": cw / tw if tw > 0 else nan,
            "cat_mean_completion": cw / cc if cc else nan,
            "cat_gap_log": math.log1p((t - last_c[-1]) / 1000.0) if len(last_c) else nan,
            "author_count_log": math.log1p(int(np.sum(ha == a))),
            "author_share": int(np.sum(ha == a)) / p if p else nan,
            "item_count_log": math.log1p(len(last_i)),
            "item_gap_log": math.log1p((t - last_i[-1]) / 1000.0) if len(last_i) else nan,
            "item_recent": float(it in set(hi_[recent].tolist())),
            "user_gap_log": math.log1p((t - hts[-1]) / 1000.0) if p else nan,
            "user_mean_completion": tw / p if p else nan,
            "item_pop_log": math.log1p(int(g_it.sum())),
            "item_completion_global": float(b_w[g_it].mean()) if g_it.any() else nan,
            "author_pop_log": math.log1p(int(np.sum(glob & (b_auth == a)))),
            "cat_pop": cat_pop,
            "log_duration": math.log(d / 1000.0) if d == d and d > 0 else nan,
        }
        if feedback is not None:
            mine_fb = [y for fu, ft, y, sp in zip(feedback["user_id"], feedback["ts"], feedback["label"], feedback["split"])
                       if sp == "train" and fu == u and ft < t]
            row["user_feedback_count_log"] = math.log1p(len(mine_fb))
            row["user_feedback_rate"] = sum(mine_fb) / len(mine_fb) if mine_fb else nan
        rows.append([row[k] for k in feature_names(feedback is not None)])
    width = len(feature_names(feedback is not None))
    return np.asarray(rows, np.float64).reshape(len(rows), width)


# ------------------------------------------------------------------------------------------- the model


@dataclass
class GBDTModel:
    """A fitted boosted ensemble as plain arrays (binary classification, numeric splits only).

    Trees are concatenated: tree k's nodes are rows tree_start[k]:tree_start[k+1]; left/right are
    indices inside the tree."""

    feature_names: tuple
    baseline: float
    tree_start: np.ndarray        # (T+1,) int64
    feature: np.ndarray           # (nodes,) int64
    threshold: np.ndarray         # (nodes,) float64
    missing_left: np.ndarray      # (nodes,) bool
    left: np.ndarray              # (nodes,) int64
    right: np.ndarray             # (nodes,) int64
    is_leaf: np.ndarray           # (nodes,) bool
    value: np.ndarray             # (nodes,) float64
    recent_n: int = 50
    recent_frac: float = 0.1
    user_feedback: bool = False   # the trees read FEEDBACK_FEATURES too (feature_names ends with them)
    # the harness's model attributes (RunScorer, evaluate): no sequence is read
    long_source: str = "none"
    long_len: int = 0
    short_len: int = 0

    @property
    def n_trees(self) -> int:
        return len(self.tree_start) - 1

    @classmethod
    def from_sklearn(cls, est, n_trees: int | None = None, recent_n: int = 50, recent_frac: float = 0.1) -> "GBDTModel":
        """The first n_trees iterations (default: all) of a fitted binary HistGradientBoostingClassifier."""
        preds = est._predictors
        names = {len(feature_names(False)): feature_names(False), len(feature_names(True)): feature_names(True)}
        if est.n_features_in_ not in names:
            raise ValueError(f"gbdt: the estimator was fitted on {est.n_features_in_} features; expected "
                             f"{len(FEATURE_NAMES)} ({', '.join(FEATURE_NAMES)}), or {len(feature_names(True))} "
                             f"with gbdt.user_feedback")
        if any(len(p) != 1 for p in preds):
            raise ValueError("gbdt: expected a binary classifier (one tree per iteration)")
        if getattr(est, "is_categorical_", None) is not None and np.any(est.is_categorical_):
            raise ValueError("gbdt: categorical splits are not supported by the array format")
        k = len(preds) if n_trees is None else int(n_trees)
        if not 1 <= k <= len(preds):
            raise ValueError(f"gbdt: n_trees must be in [1, {len(preds)}] (the fitted iterations), got {n_trees}")
        nodes = [p[0].nodes for p in preds[:k]]
        sizes = np.array([len(n) for n in nodes], np.int64)
        cat = np.concatenate(nodes)
        names = names[est.n_features_in_]
        return cls(names, float(np.ravel(est._baseline_prediction)[0]),
                   np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                   cat["feature_idx"].astype(np.int64), cat["num_threshold"].astype(np.float64),
                   cat["missing_go_to_left"].astype(bool), cat["left"].astype(np.int64), cat["right"].astype(np.int64),
                   cat["is_leaf"].astype(bool), cat["value"].astype(np.float64), int(recent_n), float(recent_frac),
                   len(names) > len(FEATURE_NAMES))

    def predict_raw(self, X: np.ndarray, n_trees: int | None = None) -> np.ndarray:
        """Logits: baseline + the sum of each tree's leaf value (NaN follows missing_left, else x <= threshold
        goes left: scikit-learn's rule)."""
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ValueError(f"gbdt: expected features of shape (n, {len(self.feature_names)}), got {X.shape}")
        out = np.full(len(X), self.baseline, np.float64)
        rows = np.arange(len(X))
        for k in range(self.n_trees if n_trees is None else min(int(n_trees), self.n_trees)):
            s = int(self.tree_start[k])
            node = np.zeros(len(X), np.int64)
            while True:
                g = s + node
                inner = ~self.is_leaf[g]
                if not inner.any():
                    break
                x = X[rows, self.feature[g]]
                go_left = np.where(np.isnan(x), self.missing_left[g], x <= self.threshold[g])
                node = np.where(inner, np.where(go_left, self.left[g], self.right[g]), node)
            out += self.value[s + node]
        return out

    # ---- state: a dict of tensors (RUNDIR/model.pt, torch.load(weights_only=True))
    def to_state(self) -> dict:
        import torch

        return {"baseline": torch.tensor([self.baseline], dtype=torch.float64),
                "tree_start": torch.from_numpy(self.tree_start.copy()), "feature": torch.from_numpy(self.feature.copy()),
                "threshold": torch.from_numpy(self.threshold.copy()),
                "missing_left": torch.from_numpy(self.missing_left.copy()),
                "left": torch.from_numpy(self.left.copy()), "right": torch.from_numpy(self.right.copy()),
                "is_leaf": torch.from_numpy(self.is_leaf.copy()), "value": torch.from_numpy(self.value.copy()),
                "windows": torch.tensor([float(self.recent_n), float(self.recent_frac)], dtype=torch.float64)}

    @classmethod
    def from_state(cls, sd: dict, feature_names=FEATURE_NAMES) -> "GBDTModel":
        need = ("baseline", "tree_start", "feature", "threshold", "missing_left", "left", "right", "is_leaf", "value",
                "windows")
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"gbdt model.pt lacks {missing}; expected the arrays written by `twinv2 train --model gbdt`")
        names = tuple(feature_names)
        if names not in (FEATURE_NAMES, FEATURE_NAMES + tuple(FEEDBACK_FEATURES)):
            raise ValueError(f"gbdt run was trained on features {list(names)}; this code computes "
                             f"{list(FEATURE_NAMES)} (+ {list(FEEDBACK_FEATURES)} with gbdt.user_feedback): retrain it")
        a = {k: sd[k].numpy() for k in need}
        return cls(names, float(a["baseline"][0]), a["tree_start"].astype(np.int64), a["feature"].astype(np.int64),
                   a["threshold"].astype(np.float64), a["missing_left"].astype(bool), a["left"].astype(np.int64),
                   a["right"].astype(np.int64), a["is_leaf"].astype(bool), a["value"].astype(np.float64),
                   int(a["windows"][0]), float(a["windows"][1]), len(names) > len(FEATURE_NAMES))

    # ---- scoring samples of a world (the featurizer is built once per world)
    def featurizer(self, world) -> Featurizer:
        cache = getattr(self, "_feat", None)
        if cache is None or cache[0] is not world:
            cache = (world, Featurizer.from_world(world, self.recent_n, self.recent_frac, self.user_feedback))
            self._feat = cache
        return cache[1]

    def predict_samples(self, world, samples) -> dict[str, np.ndarray]:
        """The dict of twinv2.training.loop.predict: user, label, logit, prob (in sample order)."""
        logit = self.predict_raw(self.featurizer(world)(samples))
        return {"user": np.asarray(samples.user), "label": np.asarray(samples.label), "logit": logit,
                "prob": 1.0 / (1.0 + np.exp(-logit))}


def fit(X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None, y_val: np.ndarray | None, params: dict,
        seed: int = 0):
    """A fitted HistGradientBoostingClassifier (early stopping on the given valid split when enabled)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    gp = gbdt_params(params)
    use_val = bool(gp["early_stopping"]) and X_val is not None and len(X_val) > 0 and len(np.unique(y_val)) == 2
    est = HistGradientBoostingClassifier(
        max_iter=int(gp["max_iter"]), learning_rate=float(gp["learning_rate"]),
        max_leaf_nodes=int(gp["max_leaf_nodes"]), min_samples_leaf=int(gp["min_samples_leaf"]),
        l2_regularization=float(gp["l2_regularization"]), max_bins=int(gp["max_bins"]),
        max_features=float(gp["max_features"]),
        early_stopping=use_val, n_iter_no_change=int(gp["n_iter_no_change"]), scoring="loss",
        random_state=int(seed))
    # scikit-learn's binning fails on a column without a single finite value (e.g. durations a log lacks):
    # such a column is constant for the trees (never split on), so give it the constant 0 instead of NaN
    empty = ~np.isfinite(X).any(axis=0) if len(X) else np.zeros(X.shape[1], bool)
    if empty.any():
        X = np.where(empty, 0.0, X)
        X_val = None if X_val is None else np.where(empty, 0.0, X_val)
    if use_val:
        est.fit(X, y, X_val=X_val, y_val=y_val)
    else:
        est.fit(X, y)
    return est
