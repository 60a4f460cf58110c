"""One chunk of complete users: behaviours before W -> cluster table + behaviour -> cluster map + stats.

Used by pipelines/cluster.py (full runs, per chunk, in worker processes) and by incremental.py."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from twinv2.clustering.embeddings import ById, ItemEmbedding
from twinv2.clustering.grouping import completion, group_of
from twinv2.clustering.hierarchical import check_method, cluster_behaviours
from twinv2.clustering.virtual_items import check_rule, virtual_items
from twinv2.data.schema import OPTIONAL_BEHAVIOR_COLUMNS

BEHAVIOUR_COLUMNS = ["user_id", "item_id", "ts", "play_ms", "duration_ms"]


@dataclass
class Catalogue(ById):
    """item_id -> (author_id, category), sorted by item_id; unknown items get -1."""

    item_id: np.ndarray
    author_id: np.ndarray
    category: np.ndarray

    @classmethod
    def from_table(cls, t: pa.Table) -> "Catalogue":
        ids = t.column("item_id").to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], t.column("author_id").to_numpy().astype(np.int64)[order],
                   t.column("category").to_numpy().astype(np.int32)[order])

    def lookup(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.item_id):
            return np.full(len(item_ids), -1, np.int64), np.full(len(item_ids), -1, np.int32)
        pos = self._rows(item_ids)
        hit = pos >= 0
        return (np.where(hit, self.author_id[pos], -1).astype(np.int64),
                np.where(hit, self.category[pos], -1).astype(np.int32))


def cross_columns(names) -> list[str]:
    """The numeric cross features present, in schema order (averaged inside clusters)."""
    return [c for c in OPTIONAL_BEHAVIOR_COLUMNS if c in names]


def prepare(table: pa.Table, W: int, edges, cross: list[str], extra: list[str] = ()) -> dict[str, np.ndarray]:
    """Columns of the behaviours with ts < W (file order: sorted by user, ts) + completion + group."""
    ts = table.column("ts").to_numpy()
    keep = ts < W
    beh = {}
    for c in [*BEHAVIOUR_COLUMNS, *cross, *extra]:
        col = table.column(c)
        if col.null_count:
            col = col.fill_null(0)
        beh[c] = col.to_numpy()[keep]
    beh["completion"] = completion(beh["play_ms"], beh["duration_ms"])
    beh["group"] = group_of(beh["completion"], edges)
    return beh


def numeric_of(beh: dict[str, np.ndarray], cross: list[str]) -> dict[str, np.ndarray]:
    return {c: beh[c] for c in ["duration_ms", "play_ms", "completion", "ts", *cross]}


def cluster_chunk(beh: dict[str, np.ndarray], emb: ItemEmbedding, cat: Catalogue, P: dict,
                  cross: list[str]) -> tuple[dict, np.ndarray]:
    """Full clustering of the users of one chunk. Returns (cluster columns, cluster_id per behaviour)."""
    X = emb.lookup(beh["item_id"])                                               # (n, d)
    cid = cluster_behaviours(X, beh["user_id"], beh["group"], int(P["gamma"]), float(P["exponent"]),
                             int(P["kmeans_iters"]), int(P["seed"]), method=cluster_method(P))
    return vitems(beh, cid, X, cat, cross, P=P), cid


def cluster_method(P: dict) -> str:
    """params cluster.method (hierarchical | flat), checked."""
    return check_method(P.get("method", "hierarchical"))


def virtual_ids(P: dict | None) -> tuple[str, int]:
    """params cluster.virtual_ids (nearest | random | majority), checked, and the seed of rule random."""
    if P is None:
        return "nearest", 0
    return check_rule(P.get("virtual_ids", "nearest")), int(P.get("seed", 0))


def vitems(beh, cid, X, cat: Catalogue, cross, rows: np.ndarray | None = None, P: dict | None = None) -> dict:
    """Virtual items of the clusters of `rows` (default all) of a chunk; P: the `cluster` params
    (virtual_ids, seed; None: the paper's nearest member)."""
    r = slice(None) if rows is None else rows
    author, category = cat.lookup(beh["item_id"][r])
    rule, seed = virtual_ids(P)
    return virtual_items(beh["user_id"][r], cid[r], beh["group"][r], X if rows is None else X[rows],
                         {k: v[r] for k, v in numeric_of(beh, cross).items()},
                         {"item_id": beh["item_id"][r], "author_id": author, "category": category},
                         rule=rule, seed=seed)


def cluster_table(cl: dict, cross: list[str]) -> pa.Table:
    d = cl["centroid"].shape[1]
    cent = pa.FixedSizeListArray.from_arrays(pa.array(cl["centroid"].astype(np.float32).reshape(-1)), d)
    cols = {
        "user_id": pa.array(cl["user_id"], pa.int64()), "cluster_id": pa.array(cl["cluster_id"], pa.int32()),
        "group": pa.array(cl["group"], pa.int8()), "size": pa.array(cl["size"], pa.int32()),
        "centroid": cent.cast(pa.list_(pa.float32())),
        "item_id": pa.array(cl["item_id"], pa.int64()), "author_id": pa.array(cl["author_id"], pa.int64()),
        "category": pa.array(cl["category"], pa.int32()),
    }
    for c in ["duration_ms", "play_ms", "completion", "ts", *cross, "sse"]:
        cols[c] = pa.array(np.asarray(cl[c], np.float64), pa.float64())
    return pa.table(cols)


def cluster_columns(t: pa.Table) -> dict[str, np.ndarray]:
    """Inverse of cluster_table."""
    out = {c: t.column(c).to_numpy() for c in t.column_names if c != "centroid"}
    cent = t.column("centroid").combine_chunks()
    n = len(t)
    flat = cent.flatten().to_numpy() if n else np.zeros(0, np.float32)
    out["centroid"] = flat.reshape(n, -1).astype(np.float32) if n else np.zeros((0, 0), np.float32)
    return out


def members_table(beh: dict, cid: np.ndarray) -> pa.Table:
    return pa.table({"user_id": pa.array(beh["user_id"], pa.int64()), "ts": pa.array(beh["ts"], pa.int64()),
                     "item_id": pa.array(beh["item_id"], pa.int64()),
                     "cluster_id": pa.array(cid, pa.int32())})


def chunk_stats(cl: dict, beh: dict, cid: np.ndarray, gamma: int) -> dict:
    """Additive counts of one chunk (summed over chunks and shards into the report)."""
    size = np.asarray(cl["size"], np.int64)
    st = {"n_users": int(len(np.unique(beh["user_id"]))), "n_behaviors": int(len(cid)),
          "n_clusters": int(len(size)), "sse": float(np.sum(cl["sse"])),
          "max_cluster_size": int(size.max()) if len(size) else 0,
          "size_hist": np.bincount(size, minlength=gamma + 1)[1:].tolist() if len(size) else [0] * gamma}
    if "true_interest" in beh and len(cid):
        # purity: share of behaviours whose cluster's majority interest is their own
        key = np.lexsort((beh["true_interest"], cid, beh["user_id"]))
        u, c, t = beh["user_id"][key], cid[key], beh["true_interest"][key]
        brk = np.ones(len(key), bool)
        brk[1:] = (u[1:] != u[:-1]) | (c[1:] != c[:-1]) | (t[1:] != t[:-1])
        runs = np.diff(np.append(np.flatnonzero(brk), len(key)))             # (user, cluster, interest) counts
        clus = np.ones(len(key), bool)
        clus[1:] = (u[1:] != u[:-1]) | (c[1:] != c[:-1])
        run_cluster = np.cumsum(clus)[np.flatnonzero(brk)] - 1
        best = np.zeros(run_cluster.max() + 1, np.int64)
        np.maximum.at(best, run_cluster, runs)
        st["purity_hits"] = int(best.sum())
        st["purity_n"] = int(len(cid))
    return st
