"""The synthetic life-cycle world: users with latent interests of four kinds, their life-cycle
behaviour histories, and labelled impressions with a known click probability p_true.

The generative process (docs/synthetic.md has the full story and every knob):

    catalogue     items with author, category, duration, Zipf popularity, a hidden quality and a
                  latent embedding (catalogue.py, calibrated to KuaiRand-Pure)
    lengths       per-user history length N_u ~ lognormal(median, p90), the longest pinned to max
    interests     each user has K_u interests, a centre in embedding space near a category centre:
                    persistent  active from join to the end
                    drifting    active throughout, centre moving to another category
                    dormant     episodes of weeks separated by months-long gaps, quiet for the last
                                `dormant_quiet_days` of history and the whole impression window
                    short       one episode of days to weeks, then gone
    behaviours    days over [join, end) with bursty intensity, sessions within days; each behaviour
                  comes from an active interest (item near its centre) or exploration (popularity);
                  completion = f(match with the active interests, duration, noise), replays > 1;
                  liked ~ Bernoulli(f(match, completion)); true_interest = the interest (-1: explore)
    impressions   after history_end_ms, in the impression window, split by time train/valid/test;
                  candidates from the user's interests (every kind) or popularity;
                  p_true = sigmoid(bias + scale * S + pop_coef * z_pop + quality + user bias + noise),
                  S = max_j g_j * max(0, cos(item, centre_j)): g = 1 for persistent/drifting and active
                  short interests, `dormant_weight` for dormant ones, `faded_weight` for short ones
                  that ended. Dormant interests are quiet in recent history, so only a model that
                  reads the whole life cycle can know them.

Everything is a pure function of (config, seed, user id): users are generated one at a time, in
increasing user_id, and never all held in memory.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Iterator

import numpy as np

from twinv2.data.catalogue import Catalogue, make_catalogue

DAY_MS = 86_400_000
PERSISTENT, DRIFTING, DORMANT, SHORT = 0, 1, 2, 3
KIND_NAMES = ("persistent", "drifting", "dormant", "short")
Z90 = 1.2815515655446004   # standard normal 90% quantile


@dataclass(frozen=True)
class WorldConfig:
    # size
    n_users: int = 300
    n_items: int = 20_000
    # per-user total behaviour count: lognormal through (median, p90), clipped to [min, max];
    # the n_heavy longest users are pinned to length_max * heavy_decay**j (j = 0..n_heavy-1)
    length_median: float = 1_700
    length_p90: float = 4_900
    length_max: int = 45_000
    length_min: int = 20
    n_heavy: int = 1
    heavy_decay: float = 0.8
    impressions_min: int = 100
    impressions_max: int = 200
    # time
    history_end_ms: int = 1_672_531_200_000          # 2023-01-01T00:00:00Z
    history_days: int = 730
    impression_days: int = 14
    train_days: int = 10
    valid_days: int = 2                              # test = the rest of the impression window
    late_join_share: float = 0.5                     # users who join after the history starts ...
    late_join_max_frac: float = 0.6                  # ... uniformly within this share of it
    idle_day_share: float = 0.25                     # days without any behaviour
    # catalogue
    dim: int = 16
    zipf_exponent: float = 1.0
    item_noise: float = 0.55
    quality_sd: float = 0.4
    # interests
    interest_spread: float = 0.5                     # centre = norm(category centre + spread * z)
    interest_kappa: float = 10.0                     # item choice in an interest ~ exp(kappa * cos) ...
    pop_bias: float = 0.5                            # ... * popularity ** pop_bias
    explore_rate: float = 0.15                       # behaviours from the popularity feed
    dormant_episode_days: tuple = (15, 45)
    dormant_gap_days: tuple = (90, 240)
    dormant_quiet_days: int = 120                    # dormant interests are silent this long before history_end
    short_episode_days: tuple = (3, 30)
    drift_segments: int = 4
    # completion and likes
    completion_bias: float = -1.0
    completion_match: float = 3.0
    completion_duration: float = 0.35                # per ln(duration / 60 s)
    completion_noise: float = 0.7
    replay_rate: float = 0.02                        # + replay_match * match above 0.5
    replay_match: float = 0.2
    # labels
    impression_interest_share: float = 0.65          # candidates from the user's interests (any kind)
    dormant_weight: float = 1.0
    faded_weight: float = 0.15
    label_bias: float = -3.3
    label_scale: float = 3.8
    pop_coef: float = 0.25
    user_bias_sd: float = 0.4
    noise_sd: float = 0.5

    @property
    def history_start_ms(self) -> int:
        return self.history_end_ms - self.history_days * DAY_MS

    @property
    def end_ms(self) -> int:
        return self.history_end_ms + self.impression_days * DAY_MS

    @property
    def train_end_ms(self) -> int:
        return self.history_end_ms + self.train_days * DAY_MS

    @property
    def valid_end_ms(self) -> int:
        return self.train_end_ms + self.valid_days * DAY_MS


PRESETS: dict[str, dict] = {
    # tests: seconds; a few users with a couple of thousand behaviours
    "tiny": dict(n_users=50, n_items=2_000, length_median=300, length_p90=900, length_max=2_500,
                 n_heavy=3, impressions_min=80, impressions_max=140),
    # `make run`: KuaiRand-27K's lengths scaled down ~5x
    "default": dict(n_users=300, n_items=20_000, length_median=1_700, length_p90=4_900, length_max=45_000),
    # KuaiRand-27K per-user lengths (median 8,594, p90 24,587, max 228,000) on 1,000 users
    "large": dict(n_users=1_000, n_items=100_000, length_median=8_594, length_p90=24_587,
                  length_max=228_000),
}


def make_config(preset: str, overrides: dict | None = None) -> WorldConfig:
    """The config of a preset with knob overrides; unknown preset or knob -> ValueError naming it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    bad = sorted(set(overrides or {}) - fields)
    if bad:
        raise ValueError(f"generate: unknown knob(s) {bad}; expected some of {sorted(fields)}")
    kw = {**PRESETS[preset], **(overrides or {})}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    cfg = WorldConfig(**kw)
    if not (cfg.length_min <= cfg.length_median < cfg.length_p90 <= cfg.length_max):
        raise ValueError("generate: need length_min <= length_median < length_p90 <= length_max, got "
                         f"{cfg.length_min}, {cfg.length_median}, {cfg.length_p90}, {cfg.length_max}")
    if cfg.train_days + cfg.valid_days >= cfg.impression_days:
        raise ValueError("generate: train_days + valid_days must be < impression_days (test needs days)")
    if cfg.n_users < 1 or cfg.n_items < 100:
        raise ValueError(f"generate: need n_users >= 1 and n_items >= 100, got {cfg.n_users}, {cfg.n_items}")
    return cfg


def sample_lengths(cfg: WorldConfig, seed: int) -> np.ndarray:
    """(n_users,) int64 total behaviours per user (user_id = index + 1). Cheap: no behaviours drawn."""
    rng = np.random.default_rng([seed, 0x1E6])
    sigma = math.log(cfg.length_p90 / cfg.length_median) / Z90
    # stratified (Latin hypercube) normal draws: one per 1/n quantile slice, in random user order,
    # so the sample quantiles sit close to their targets even for a few hundred users
    u = (rng.permutation(cfg.n_users) + rng.random(cfg.n_users)) / cfg.n_users
    z = np.array([NormalDist().inv_cdf(float(v)) for v in u])             # (n_users,)
    x = cfg.length_median * np.exp(sigma * z)
    x = np.clip(np.round(x), cfg.length_min, cfg.length_max).astype(np.int64)
    top = np.argsort(-x, kind="stable")[: cfg.n_heavy]
    x[top] = np.round(cfg.length_max * cfg.heavy_decay ** np.arange(len(top))).astype(np.int64)
    return x


# ---------------------------------------------------------------- one user


@dataclass
class _Interests:
    kind: np.ndarray        # (K,) int
    weight: np.ndarray      # (K,) float
    centre: np.ndarray      # (K, S, D) centre per drift segment (S = drift_segments)
    pool: list              # [K] item-index arrays the interest draws from
    act: np.ndarray         # (K, n_days) bool, over days join_day .. total_days-1
    cdf_cache: dict = dataclasses.field(default_factory=dict)   # (j, segment) -> item-choice cdf


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class World:
    """A seeded world: the catalogue plus per-user generation (user by user, deterministic)."""

    def __init__(self, cfg: WorldConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.cat: Catalogue = make_catalogue(cfg.n_items, seed, cfg.dim, cfg.zipf_exponent,
                                             cfg.item_noise, cfg.quality_sd)
        self.pop_cdf = np.cumsum(self.cat.popularity)
        self.pop_cdf /= self.pop_cdf[-1]
        lp = self.log_pop = np.log(self.cat.popularity)
        self.z_pop = ((lp - lp.mean()) / lp.std()).astype(np.float32)        # (I,)
        self.lengths = sample_lengths(cfg, seed)
        self.total_days = cfg.history_days + cfg.impression_days
        self.cat_share = np.bincount(self.cat.category, minlength=len(self.cat.cat_centre))[1:] + 1.0
        self.cat_share = self.cat_share / self.cat_share.sum()               # (46,)

    # -- interests
    def _interests(self, rng: np.random.Generator, n_total: int, join_day: int) -> _Interests:
        cfg, cat = self.cfg, self.cat
        n_short = min(8, rng.poisson(1 + 1.5 * math.log10(max(n_total, 10) / 10)))
        kinds = ([PERSISTENT] * (1 + min(2, rng.poisson(1.0))) + [DRIFTING] * rng.binomial(2, 0.5)
                 + [DORMANT] * (1 + rng.binomial(2, 0.5)) + [SHORT] * n_short)
        kind = np.array(kinds)
        K, S, D = len(kind), cfg.drift_segments, cfg.dim
        cats = rng.choice(len(self.cat_share), size=K, replace=K > len(self.cat_share), p=self.cat_share) + 1
        start = _norm(cat.cat_centre[cats] + cfg.interest_spread * rng.standard_normal((K, D)) / math.sqrt(D))
        to_cat = rng.choice(len(self.cat_share), size=K, p=self.cat_share) + 1
        end = _norm(cat.cat_centre[to_cat] + cfg.interest_spread * rng.standard_normal((K, D)) / math.sqrt(D))
        frac = (np.arange(S) + 0.5) / S                                      # segment mid-points
        centre = np.repeat(start[:, None, :], S, axis=1)                     # (K, S, D)
        drift = kind == DRIFTING
        centre[drift] = _norm(start[drift, None, :] * (1 - frac)[None, :, None]
                              + end[drift, None, :] * frac[None, :, None])
        pool = [np.union1d(cat.by_category[cats[j]], cat.by_category[to_cat[j]]) if drift[j]
                else cat.by_category[cats[j]] for j in range(K)]
        pool = [p if len(p) else np.arange(len(cat)) for p in pool]
        weight = rng.gamma(2.0, 1.0, size=K) * np.array([1.0, 0.8, 0.8, 1.2])[kind]

        n_days = self.total_days - join_day
        act = np.zeros((K, n_days), dtype=bool)
        quiet = cfg.history_days - cfg.dormant_quiet_days - join_day        # day index (user-relative)
        lo_e, hi_e = cfg.dormant_episode_days
        lo_g, hi_g = cfg.dormant_gap_days
        for j in range(K):
            if kind[j] in (PERSISTENT, DRIFTING):
                act[j] = True
            elif kind[j] == DORMANT:
                d = int(rng.integers(0, 60))
                while d < quiet:
                    e = d + int(rng.integers(lo_e, hi_e + 1))
                    act[j, d:min(e, quiet)] = True
                    d = e + int(rng.integers(lo_g, hi_g + 1))
            else:
                d = int(rng.integers(0, max(1, n_days - 3)))
                act[j, d:d + int(rng.integers(cfg.short_episode_days[0], cfg.short_episode_days[1] + 1))] = True
        return _Interests(kind, weight, centre.astype(np.float32), pool, act)

    def _pick(self, rng: np.random.Generator, it: _Interests, j: int, seg: int, n: int) -> np.ndarray:
        """n item indices from interest j around its centre of drift segment seg."""
        pool = it.pool[j]
        cdf = it.cdf_cache.get((j, seg))
        if cdf is None:
            logit = self.cfg.interest_kappa * (self.cat.emb[pool] @ it.centre[j, seg])
            logit += self.cfg.pop_bias * self.log_pop[pool]
            cdf = it.cdf_cache[(j, seg)] = np.cumsum(np.exp(logit - logit.max()))
        return pool[np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(pool) - 1)]

    def _explore(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(self.pop_cdf, rng.random(n), side="right"), len(self.cat) - 1)

    # -- one user
    def user(self, uid: int) -> tuple[dict, dict, dict]:
        """(behaviours, impressions, stats) of user `uid` (1-based), each a dict of numpy columns."""
        cfg, cat = self.cfg, self.cat
        rng = np.random.default_rng([self.seed, uid, 0x5EED])
        n_total = int(self.lengths[uid - 1])
        join_day = 0 if rng.random() >= cfg.late_join_share else int(rng.integers(0, int(cfg.late_join_max_frac * cfg.history_days)))
        it = self._interests(rng, n_total, join_day)
        K, n_days, S = len(it.kind), it.act.shape[1], cfg.drift_segments

        # days and sessions: bursty daily intensity (weekly mood x daily noise), some idle days
        lam = rng.gamma(0.8, 1.0, n_days) * rng.gamma(1.5, 1.0, n_days // 7 + 1)[np.arange(n_days) // 7]
        lam[rng.random(n_days) < cfg.idle_day_share] = 0.0
        lam[-1] += 1e-9
        counts = rng.multinomial(n_total, lam / lam.sum())                   # (n_days,)
        day = np.repeat(np.arange(n_days), counts)                           # (N,) sorted
        n_sess = 1 + counts // 30                                            # sessions per day
        first_sess = np.concatenate([[0], np.cumsum(n_sess)[:-1]])
        sess = first_sess[day] + (rng.random(n_total) * n_sess[day]).astype(np.int64)
        order = np.argsort(sess, kind="stable")
        day, sess = day[order], sess[order]
        seg = np.minimum((day * S) // n_days, S - 1)                          # drift segment (N,)

        # source of each behaviour: explore, or an active interest ~ weight
        w = it.weight[:, None] * it.act                                      # (K, n_days)
        p_src = np.vstack([np.full((1, n_days), cfg.explore_rate), (1 - cfg.explore_rate) * w / np.maximum(w.sum(0), 1e-12)])
        cdf = np.cumsum(p_src[:, day], axis=0)                               # (K+1, N)
        src = (rng.random(n_total)[None, :] > cdf).sum(0) - 1                # -1 = explore, else j
        src = np.minimum(src, K - 1)
        item = np.empty(n_total, dtype=np.int64)
        m = src < 0
        item[m] = self._explore(rng, int(m.sum()))
        for j in range(K):
            for s in range(S if it.kind[j] == DRIFTING else 1):
                m = (src == j) & ((seg == s) if it.kind[j] == DRIFTING else True)
                if m.any():
                    item[m] = self._pick(rng, it, j, s, int(m.sum()))

        # match with the active interests -> completion, replays, likes
        cos = np.empty((K, n_total), dtype=np.float32)                       # (K, N)
        for s in range(S):
            m = seg == s
            cos[:, m] = it.centre[:, s, :] @ cat.emb[item[m]].T
        cos = np.where(it.act[:, day], cos, -1.0)
        match = cos.max(0)                                                   # (N,)
        dur = cat.duration_ms[item].astype(np.float64)
        z = (cfg.completion_bias + cfg.completion_match * match
             - cfg.completion_duration * np.log(dur / 60_000.0) + cfg.completion_noise * rng.standard_normal(n_total))
        ratio = 1.0 / (1.0 + np.exp(-z))
        replay = rng.random(n_total) < cfg.replay_rate + cfg.replay_match * np.clip(match - 0.5, 0, None)
        ratio = np.where(replay, np.minimum(1.0 + rng.exponential(0.5, n_total), 4.0), ratio)
        play = np.maximum(np.round(ratio * dur), 1).astype(np.int64)
        liked = rng.random(n_total) < 1 / (1 + np.exp(-(-6.0 + 2.5 * match + 1.5 * np.minimum(ratio, 1.5))))

        # timestamps: session start in [06:00, 23:00) of its day, then back-to-back plays + pauses
        day_start = cfg.history_start_ms + (join_day + day) * DAY_MS
        sess_start = rng.integers(6 * 3_600_000, 23 * 3_600_000, size=int(n_sess.sum()))
        step = play + (500 + rng.exponential(4_000, n_total)).astype(np.int64)
        cum = np.cumsum(step) - step
        first = np.searchsorted(sess, sess, side="left")                     # sess sorted
        ts = day_start + sess_start[sess] + (cum - cum[first])
        ts = np.minimum(ts, cfg.end_ms - 1)
        o = np.argsort(ts, kind="stable")
        beh = {"user_id": np.full(n_total, uid, np.int64), "item_id": cat.item_id[item[o]], "ts": ts[o],
               "play_ms": play[o].astype(np.int32), "duration_ms": cat.duration_ms[item[o]],
               "liked": liked[o].astype(np.int8), "true_interest": src[o].astype(np.int32)}

        imp, istats = self._impressions(rng, uid, it, join_day)
        stats = {"match": float(match.mean()), "ratio_mean": float(ratio.mean()), "replays": int(replay.sum()),
                 "likes": int(liked.sum()), "explore": int((src < 0).sum()),
                 "kinds": np.bincount(it.kind, minlength=4), "interest_kind": it.kind, "join_day": join_day,
                 **istats}
        return beh, imp, stats

    def _impressions(self, rng: np.random.Generator, uid: int, it: _Interests, join_day: int) -> tuple[dict, dict]:
        cfg, cat = self.cfg, self.cat
        n = int(rng.integers(cfg.impressions_min, cfg.impressions_max + 1))
        K, S = len(it.kind), cfg.drift_segments
        ts = np.sort(cfg.history_end_ms + rng.integers(0, cfg.impression_days * DAY_MS, size=n))
        from_interest = rng.random(n) < cfg.impression_interest_share
        j_of = rng.integers(0, K, size=n)                                    # uniform over interests
        item = self._explore(rng, n)
        for j in range(K):
            m = from_interest & (j_of == j)
            if m.any():
                item[m] = self._pick(rng, it, j, S - 1, int(m.sum()))
        # interest state at each impression: g_j(t)
        day = np.minimum((ts - cfg.history_start_ms) // DAY_MS - join_day, it.act.shape[1] - 1)
        g = np.ones((K, n))
        g[it.kind == DORMANT] = cfg.dormant_weight
        short = it.kind == SHORT
        g[short] = np.where(it.act[short][:, day], 1.0, cfg.faded_weight)
        cos = np.clip(it.centre[:, S - 1, :] @ cat.emb[item].T, 0, None)     # (K, n)
        s_all = (g * cos).max(0)
        g_recent = np.where((it.kind == DORMANT)[:, None], 0.0, g)
        s_recent = (g_recent * cos).max(0)
        user_bias = cfg.user_bias_sd * rng.standard_normal()
        noise = cfg.noise_sd * rng.standard_normal(n)
        base = cfg.label_bias + cfg.pop_coef * self.z_pop[item] + cat.quality[item] + user_bias + noise
        p = 1 / (1 + np.exp(-(base + cfg.label_scale * s_all)))
        p_recent = 1 / (1 + np.exp(-(base + cfg.label_scale * s_recent)))
        label = (rng.random(n) < p).astype(np.int8)
        split = np.where(ts < cfg.train_end_ms, "train", np.where(ts < cfg.valid_end_ms, "valid", "test"))
        imp = {"user_id": np.full(n, uid, np.int64), "item_id": cat.item_id[item], "ts": ts.astype(np.int64),
               "label": label, "split": split, "p_true": p.astype(np.float32)}
        # the logit of p_true term by term (logit = bias + sum of the parts; bench/bench_oracle_gap.py), and the
        # kind of the interest that sets S (-1: S = 0, no active interest is near the item)
        top = (g * cos).argmax(0)
        parts = {"interest": cfg.label_scale * s_all, "interest_recent": cfg.label_scale * s_recent,
                 "pop": cfg.pop_coef * self.z_pop[item].astype(np.float64),
                 "quality": cat.quality[item].astype(np.float64),
                 "user_bias": np.full(n, user_bias), "noise": noise,
                 "top_kind": np.where(s_all > 0, it.kind[top], -1).astype(np.int8)}
        return imp, {"p_recent": p_recent.astype(np.float32), "parts": parts}

    def users(self) -> Iterator[tuple[dict, dict, dict]]:
        for uid in range(1, self.cfg.n_users + 1):
            yield self.user(uid)
