"""Item embeddings for clustering: a trained model's, or a bootstrap one computed from the data.

Trained: `item_embeddings.npz` (arrays item_id (N,) int64, emb (N, d) float32, version str), written by
every training run (docs/architecture.md). `load_npz(path)` accepts the file or a directory holding it.

Bootstrap (before any model exists): items that are watched close together by the same user are similar.
C[i, j] = number of times items i and j are watched within `window` consecutive behaviours of one user
(behaviours with ts < W only, so nothing after the watermark leaks in); the embedding is the truncated SVD
(scikit-learn TruncatedSVD, fixed random_state) of log(1 + C), rows L2-normalised. Items never seen (or
seen without neighbours) get the mean embedding of their category's seen items plus a small hashed
jitter, or a hashed random unit vector when the category has no seen item: deterministic either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from twinv2.data.store import stable_hash


class IdIndex:
    """Row of each id in a sorted id array, -1 when absent: a dense id -> row table when the ids are
    compact (max id < 4 n + 1024: one gather per lookup), a binary search otherwise."""

    def __init__(self, sorted_ids: np.ndarray):
        self.ids = np.asarray(sorted_ids, np.int64)
        n = len(self.ids)
        self.table = None
        if n and self.ids[0] >= 0 and self.ids[-1] < 4 * n + 1024:
            self.table = np.full(int(self.ids[-1]) + 2, -1, np.int64)        # last slot: out of range
            self.table[self.ids] = np.arange(n)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        if self.table is not None:
            return self.table[np.where((ids >= 0) & (ids < len(self.table) - 1), ids, len(self.table) - 1)]
        if not len(self.ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[pos] == ids, pos, -1)


class ById:
    """For tables sorted by `item_id`: `_rows(ids)` through an IdIndex built on first use (not pickled:
    a worker process builds its own)."""

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        if self.__dict__.get("_index") is None:
            self._index = IdIndex(self.item_id)
        return self._index.rows(ids)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_index"}


@dataclass
class ItemEmbedding(ById):
    item_id: np.ndarray          # (N,) int64, sorted
    emb: np.ndarray              # (N, d) float32
    version: str
    source: str                  # "bootstrap" | a file path | an MLflow URI

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def lookup(self, item_ids: np.ndarray) -> np.ndarray:
        """(n, d) float32 embeddings; ids not in the table get the hashed fallback vector."""
        ids = np.asarray(item_ids, np.int64)
        pos = self._rows(ids)
        hit = pos >= 0
        if hit.all():
            return self.emb[pos].astype(np.float32, copy=False)
        out = np.empty((len(ids), self.dim), np.float32)
        out[hit] = self.emb[pos[hit]]
        out[~hit] = hashed_vectors(ids[~hit], self.dim)
        return out

    def save(self, path: str | Path) -> None:
        from twinv2.io import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, item_id=self.item_id, emb=self.emb, version=np.array(self.version),
                         source=np.array(self.source))


def hashed_vectors(item_ids: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) deterministic pseudo-random unit vectors from the item ids."""
    ids = np.asarray(item_ids, np.int64)
    h = stable_hash((ids[:, None] * 1_000_003 + np.arange(dim)[None, :]).reshape(-1)).reshape(len(ids), dim)
    v = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) - 0.5
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v.astype(np.float32)


def load_npz(path: str | Path, source: str | None = None) -> ItemEmbedding:
    p = Path(path)
    if p.is_dir():
        p = p / "item_embeddings.npz"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no item embeddings; expected item_embeddings.npz (item_id, emb, version) "
                                "from a training run directory")
    try:
        z = np.load(p, allow_pickle=False)
        item_id, emb = np.asarray(z["item_id"], np.int64), np.asarray(z["emb"], np.float32)
        version = str(z["version"]) if "version" in z.files else "unknown"
        src = str(z["source"]) if "source" in z.files else (source or str(p))
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{p}: not a valid item_embeddings.npz ({e}); expected arrays item_id (N,) int64, "
                         "emb (N, d) float32 and a string version") from None
    if emb.ndim != 2 or len(emb) != len(item_id):
        raise ValueError(f"{p}: emb has shape {emb.shape} but item_id has {len(item_id)} rows; expected (N, d)")
    order = np.argsort(item_id, kind="stable")
    return ItemEmbedding(item_id[order], emb[order], version, source or src)


def from_checkpoint(path: str | Path) -> ItemEmbedding:
    """The item-id embedding table of trained weights: RUN/model.pt (the run's best weights) or an epoch
    checkpoint RUN/checkpoints/epoch-NNNN.pt (that epoch's weights), rows mapped to item ids by the run's
    vocab.npz. Version `<run name>-<hash of the weights>`: for model.pt the version training wrote into
    item_embeddings.npz (tested)."""
    from twinv2.artifacts import load_checkpoint, state_hash, vocab_item_ids

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint; expected RUN/model.pt or RUN/checkpoints/epoch-NNNN.pt")
    run = next((d for d in (p.parent, p.parent.parent) if (d / "vocab.npz").is_file()), None)
    if run is None:
        raise FileNotFoundError(f"{p}: no vocab.npz beside it or in its run directory; expected the model.pt "
                                "or checkpoints/epoch-NNNN.pt of a `twinv2 train` run")
    sd = load_checkpoint(p)
    if isinstance(sd.get("model"), dict):                                 # an epoch checkpoint
        sd = sd["model"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}           # saved from a DDP wrapper
    if "features.item.weight" not in sd:
        raise ValueError(f"{p}: no features.item.weight in the weights; expected a twinv2 model's state dict")
    item_ids = vocab_item_ids(run / "vocab.npz").astype(np.int64)
    table = sd["features.item.weight"].detach().float().cpu().numpy()
    return ItemEmbedding(item_ids, table[1:len(item_ids) + 1].astype(np.float32), f"{run.name}-{state_hash(sd)}",
                         str(p))


def bootstrap(chunks: Iterable[dict[str, np.ndarray]], items_id: np.ndarray, items_category: np.ndarray,
              dim: int, seed: int, version: str, window: int = 5) -> ItemEmbedding:
    """SVD of item co-occurrence. chunks: dicts with user_id, item_id (sorted by user, ts; ts < W)."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    vocab = np.unique(np.asarray(items_id, np.int64))
    V = len(vocab)
    C = sp.csr_matrix((V, V), dtype=np.float64)
    for ch in chunks:
        u = np.asarray(ch["user_id"], np.int64)
        it = np.searchsorted(vocab, np.asarray(ch["item_id"], np.int64))
        known = np.ones(len(it), bool) if V == 0 else (it < V) & (vocab[np.minimum(it, V - 1)] == ch["item_id"])
        rows, cols = [], []
        for lag in range(1, window + 1):
            same = (u[lag:] == u[:-lag]) & known[lag:] & known[:-lag]
            a, b = it[:-lag][same], it[lag:][same]
            rows += [a, b]
            cols += [b, a]
        if rows:
            r, c = np.concatenate(rows), np.concatenate(cols)
            C = C + sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(V, V))
    C.data = np.log1p(C.data)
    emb = np.zeros((V, dim), np.float64)
    seen = np.asarray(C.getnnz(axis=1) > 0)
    if seen.sum() > 2:
        k = int(min(dim, seen.sum() - 1, V - 1))
        Z = TruncatedSVD(n_components=k, random_state=seed, n_iter=7).fit_transform(C)   # (V, k)
        emb[:, :k] = Z
        norm = np.linalg.norm(emb, axis=1)
        seen &= norm > 1e-12
        emb[seen] /= norm[seen][:, None]
    emb[~seen] = 0.0
    # unseen items: category mean of seen items (+ small jitter), else a hashed vector
    ids_all = np.asarray(items_id, np.int64)
    _, first = np.unique(ids_all, return_index=True)                         # aligned with vocab
    cat = np.asarray(items_category, np.int64)[first]
    fallback = hashed_vectors(vocab[~seen], dim).astype(np.float64)
    if (~seen).any() and seen.any():
        cats, inv = np.unique(cat, return_inverse=True)
        sums = np.zeros((len(cats), dim))
        np.add.at(sums, inv[seen], emb[seen])
        cnt = np.bincount(inv[seen], minlength=len(cats))
        has = cnt[inv[~seen]] > 0
        mean = sums[inv[~seen]] / np.maximum(cnt[inv[~seen]], 1)[:, None]
        fallback = np.where(has[:, None], mean + 0.1 * fallback, fallback)
        fallback /= np.maximum(np.linalg.norm(fallback, axis=1, keepdims=True), 1e-12)
    emb[~seen] = fallback
    return ItemEmbedding(vocab, emb.astype(np.float32), version, "bootstrap")
