"""The synthetic item catalogue, calibrated to the real KuaiRand-Pure video table.

Every number in the CALIBRATION block below was computed once from
`../shared/data/kuairand-pure/video_features_basic_pure.csv` (7,583 videos; KuaiRand, Gao et al.,
CIKM 2022) and is hard-coded so the generator runs without that file:

- categories: the `tag` column holds 1-3 comma-separated tag ids; 46 distinct tags occur.
  75.1% of tagged videos have one tag, 23.5% two, 0.4% three (we model at most one secondary tag:
  P(secondary) = 0.239). 1.3% of videos have no tag (not modelled: every synthetic item has one).
- items per author: 6,510 authors; 86.96% own 1 video, 11.03% own 2, ... one owns 26 (pmf below).
  An author's videos share its dominant first tag 88.5% of the time (authors with >= 3 videos).
- duration: `video_duration` quantiles (ms) below; sampled by inverse-CDF with log-linear
  interpolation between the quantiles, so the synthetic marginal matches the real one.
- popularity is not in the table; we use a Zipf-like long tail (exponent `zipf_exponent`), the
  usual shape of view counts on short-video platforms.

Items also get a latent embedding (never stored): the primary tag's centre, plus half the secondary
tag's centre, plus item noise, normalised. Users' interests live in the same space (synthetic.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- CALIBRATION (KuaiRand-Pure)
# The 46 tag ids of KuaiRand-Pure, most frequent first; our category c (1..46) is KUAIRAND_TAGS[c-1].
KUAIRAND_TAGS = (39, 3, 20, 12, 62, 43, 68, 9, 6, 7, 2, 1, 15, 17, 67, 11, 4, 8, 28, 60, 25, 5, 18, 19,
                 10, 26, 42, 27, 38, 36, 14, 24, 21, 34, 22, 29, 13, 35, 65, 30, 16, 37, 54, 40, 56, 23)
# Videos whose FIRST tag is this tag (the primary category), aligned with KUAIRAND_TAGS.
PRIMARY_TAG_COUNTS = (1437, 732, 675, 606, 161, 0, 1, 418, 378, 340, 289, 254, 245, 220, 46, 175, 90,
                      177, 145, 0, 136, 87, 59, 96, 87, 82, 29, 48, 54, 41, 43, 41, 41, 35, 37, 35, 33,
                      33, 14, 31, 13, 11, 0, 5, 4, 3)
# Videos carrying this tag in 2nd/3rd place (the secondary category).
SECONDARY_TAG_COUNTS = (9, 0, 0, 0, 328, 428, 427, 1, 22, 43, 7, 0, 0, 0, 160, 6, 87, 0, 0, 144, 0,
                        15, 43, 3, 2, 0, 46, 10, 0, 5, 0, 0, 0, 5, 0, 0, 0, 0, 19, 0, 3, 0, 10, 0, 0, 0)
P_SECONDARY_TAG = 0.239
# Number of authors owning k videos, k = key.
ITEMS_PER_AUTHOR_COUNTS = {1: 5661, 2: 718, 3: 90, 4: 24, 5: 7, 6: 5, 7: 3, 8: 1, 26: 1}
AUTHOR_HOME_TAG_SHARE = 0.885
# video_duration quantiles (ms) at DURATION_Q.
DURATION_Q = (0.0, 0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55,
              0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 0.98, 0.99, 1.0)
DURATION_MS = (5000, 7444, 8430, 10725, 14592, 18800, 24486, 31949, 40766, 51833, 62733, 71144, 81170,
               89421, 100152, 114416, 129817, 148228, 170300, 197373, 237829, 303456, 413666, 510023,
               1177720)
N_CATEGORIES = len(KUAIRAND_TAGS)   # 46
# ----------------------------------------------------------------


@dataclass
class Catalogue:
    """The items of a synthetic world, indexed by item_id - 1 (ids are 1..n)."""

    item_id: np.ndarray       # (I,) int64, 1..I
    author_id: np.ndarray     # (I,) int64
    category: np.ndarray      # (I,) int32, 1..46 (primary tag)
    category2: np.ndarray     # (I,) int32, secondary tag or 0
    duration_ms: np.ndarray   # (I,) int32
    popularity: np.ndarray    # (I,) float64, sums to 1 (Zipf-like)
    quality: np.ndarray       # (I,) float32, hidden per-item appeal (enters p_true)
    emb: np.ndarray           # (I, D) float32, unit-norm latent embedding
    cat_centre: np.ndarray    # (46+1, D) float32, row c = centre of category c (row 0 unused)
    by_category: list         # [c] -> int64 array of item indices (0-based) with primary or secondary tag c

    def __len__(self) -> int:
        return len(self.item_id)


def sample_durations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Inverse-CDF sampling of KuaiRand-Pure durations (log-linear between the quantiles)."""
    u = rng.random(n)
    return np.exp(np.interp(u, DURATION_Q, np.log(DURATION_MS))).round().astype(np.int32)


def _shares(counts) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64) + 0.5       # every category possible, even if rare
    return c / c.sum()


def make_catalogue(n_items: int, seed: int, dim: int = 16, zipf_exponent: float = 1.0,
                   item_noise: float = 0.55, quality_sd: float = 0.4) -> Catalogue:
    """Draw a catalogue of n_items items, deterministic for `seed`."""
    rng = np.random.default_rng([seed, 0xCA7])
    # authors: sizes from the real items-per-author pmf until n_items are covered
    ks = np.array(sorted(ITEMS_PER_AUTHOR_COUNTS), dtype=np.int64)
    pk = np.array([ITEMS_PER_AUTHOR_COUNTS[k] for k in ks], dtype=np.float64)
    sizes = rng.choice(ks, size=n_items, p=pk / pk.sum())          # more than enough authors
    cut = int(np.searchsorted(np.cumsum(sizes), n_items)) + 1
    sizes = sizes[:cut]
    sizes[-1] -= int(sizes.sum() - n_items)                          # (A,), sums to n_items
    n_authors = len(sizes)
    author_of = np.repeat(np.arange(1, n_authors + 1, dtype=np.int64), sizes)  # (I,)

    p1, p2 = _shares(PRIMARY_TAG_COUNTS), _shares(SECONDARY_TAG_COUNTS)
    home = rng.choice(N_CATEGORIES, size=n_authors, p=p1) + 1        # (A,) author's home category
    own = rng.random(n_items) < AUTHOR_HOME_TAG_SHARE
    other = rng.choice(N_CATEGORIES, size=n_items, p=p1) + 1
    category = np.where(own, home[author_of - 1], other).astype(np.int32)
    cat2 = (rng.choice(N_CATEGORIES, size=n_items, p=p2) + 1).astype(np.int32)
    cat2[(rng.random(n_items) >= P_SECONDARY_TAG) | (cat2 == category)] = 0

    # shuffle so item ids are not grouped by author
    perm = rng.permutation(n_items)
    author_of, category, cat2 = author_of[perm], category[perm], cat2[perm]

    duration = sample_durations(rng, n_items)
    ranks = rng.permutation(n_items) + 1
    pop = ranks.astype(np.float64) ** -zipf_exponent
    pop /= pop.sum()
    quality = (rng.standard_normal(n_items) * quality_sd).astype(np.float32)

    centre = rng.standard_normal((N_CATEGORIES + 1, dim))
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    centre[0] = 0.0
    emb = centre[category] + 0.5 * centre[cat2] + item_noise * rng.standard_normal((n_items, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    idx = np.arange(n_items)
    by_cat = [np.zeros(0, np.int64)] + [idx[(category == c) | (cat2 == c)] for c in range(1, N_CATEGORIES + 1)]
    return Catalogue(item_id=np.arange(1, n_items + 1, dtype=np.int64), author_id=author_of,
                     category=category, category2=cat2, duration_ms=duration, popularity=pop,
                     quality=quality, emb=emb.astype(np.float32), cat_centre=centre.astype(np.float32),
                     by_category=by_cat)
