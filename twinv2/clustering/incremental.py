"""Incremental clustering: bring a cluster version from watermark W_old to W_new.

Per user of a chunk (behaviours with ts < W_new, sorted by ts; the old ones are the prefix ts < W_old):
  - rebuilt from scratch (same procedure as a full run) when the user is new, when the embedding version
    changed (rebuild_all), when the stored members no longer match the behaviours (data changed), or when
    the drift measure passes the threshold: drift = m / (n_old + m), the share of the user's history
    that is new since W_old (m new behaviours on n_old old ones; cluster.drift_threshold, default 0.25);
  - otherwise updated: each new behaviour joins the nearest centroid of its completion group (a group
    without any cluster yet gets its new behaviours clustered from scratch), and every touched cluster
    is updated exactly with running means:
        c' = (n c + m xbar) / (n + m),   f' = (n f + sum f_new) / (n + m)   for every numeric feature,
        sse' = sse + n ||c - c'||^2 + sum ||x_new - c'||^2                  (parallel-axis theorem),
    its representative (item_id, author_id, category) is re-chosen as the member nearest c' (a new member
    takes over when it is nearer; with cluster.virtual_ids random | majority: by that rule over all its
    members, as a full run would), and a cluster grown past gamma is re-split with the same recursive
    procedure as a full run. cluster.method flat is not supported here (a clear error: run a full clustering).
The output satisfies the invariants of a full run: every behaviour before W_new in exactly one cluster,
sizes <= gamma, one group per cluster, means equal to the members' means.
"""
from __future__ import annotations

import numpy as np

from twinv2.clustering.chunk import Catalogue, cluster_method, numeric_of, virtual_ids, vitems
from twinv2.clustering.embeddings import ItemEmbedding
from twinv2.clustering.hierarchical import cluster_behaviours, cluster_sets
from twinv2.clustering.kmeans import root_keys
from twinv2.clustering.virtual_items import pick_ids
from twinv2.data.store import run_starts

_RESPLIT_SALT = 0x5EED
_ID_SPAN = np.int64(1) << np.int64(31)                                    # user * span + cluster id: one sort key


def update_chunk(beh: dict, old: dict, old_m: dict, emb: ItemEmbedding, cat: Catalogue, P: dict,
                 cross: list[str], W_old: int, rebuild_all: bool = False) -> tuple[dict, np.ndarray, dict]:
    """beh: behaviours of complete users (ts < W_new), sorted by (user, ts); old: the users' cluster
    columns in the base version; old_m: their members (user_id, ts, item_id, cluster_id), same order.
    Returns (cluster columns, cluster id per behaviour, counts)."""
    check_incremental(P)
    rule, rule_seed = virtual_ids(P)
    user, ts = beh["user_id"], beh["ts"]
    if len(user) and (user[1:] < user[:-1]).any():
        raise ValueError("update_chunk: behaviours must be sorted by (user_id, ts)")
    gamma, thr = int(P["gamma"]), float(P["drift_threshold"])
    num_keys = list(numeric_of(beh, cross))
    # members by user (stable: a user's rows keep their ts order); parts of a sharded base interleave users
    mu = np.asarray(old_m["user_id"])
    if len(mu) and (mu[1:] < mu[:-1]).any():                             # (usually sorted already)
        m_order = np.argsort(mu, kind="stable")
        old_m = {k: np.asarray(v)[m_order] for k, v in old_m.items()}
    n = len(user)
    cid = np.full(n, -1, np.int64)
    ustart = run_starts(user)
    uu, uend = user[ustart], np.append(ustart[1:], n)                   # one run of rows per user
    # old clusters / members by user (both sorted by user)
    okey = np.asarray(old["user_id"], np.int64) * _ID_SPAN + old["cluster_id"]  # one sort key per old cluster
    if len(okey) and (okey[1:] < okey[:-1]).any():
        ocl_order = np.argsort(okey, kind="stable")
        old, okey = {k: v[ocl_order] for k, v in old.items()}, okey[ocl_order]
    keep_old = np.zeros(len(old["user_id"]), bool)                       # old cluster rows carried over
    new_parts: list[dict] = []                                            # re-split / orphan / rebuilt clusters
    rebuild_rows, split_rows, split_root, split_user, split_tag = [], [], [], [], []
    next_id: dict[int, int] = {}
    upd_new: list[np.ndarray] = []                                        # new rows of updated users
    upd_users: list[tuple] = []                                           # their (row, old-cluster) ranges
    stats = {"users_updated": 0, "users_rebuilt": 0, "users_new": 0, "new_behaviors": 0, "clusters_resplit": 0}

    for u, lo, hi in zip(uu, ustart, uend):
        n_old = int(np.searchsorted(ts[lo:hi], W_old, side="left"))
        m = int(hi - lo - n_old)
        stats["new_behaviors"] += m
        mlo, mhi = np.searchsorted(old_m["user_id"], [u, u + 1]) if len(old_m["user_id"]) else (0, 0)
        clo, chi = np.searchsorted(old["user_id"], [u, u + 1]) if len(old["user_id"]) else (0, 0)
        matches = (mhi - mlo == n_old and np.array_equal(old_m["ts"][mlo:mhi], ts[lo:lo + n_old])
                   and np.array_equal(old_m["item_id"][mlo:mhi], beh["item_id"][lo:lo + n_old]))
        if mhi == mlo or not matches or rebuild_all or (m / (n_old + m) > thr):
            stats["users_new" if mhi == mlo else "users_rebuilt"] += 1
            rebuild_rows.append(np.arange(lo, hi))
            continue
        cid[lo:lo + n_old] = old_m["cluster_id"][mlo:mhi]
        keep_old[clo:chi] = True
        next_id[int(u)] = int(old["cluster_id"][clo:chi].max()) + 1 if chi > clo else 0
        if m == 0:
            continue
        stats["users_updated"] += 1
        rows_new = np.arange(lo + n_old, hi)
        X_new = emb.lookup(beh["item_id"][rows_new])                         # (m, d) float32, as k-means
        g_new = beh["group"][rows_new]
        c_rows = np.arange(clo, chi)
        for g in np.unique(g_new):
            sel = g_new == g
            cand = c_rows[old["group"][c_rows] == g]
            if not len(cand):                                                # a new group for this user
                split_rows.append(rows_new[sel])
                split_tag.append(("orphan", int(u), int(g)))
                continue
            Cg = old["centroid"][cand]                                       # (c, d) float32
            d2 = (Cg ** 2).sum(1)[None, :] - 2 * X_new[sel] @ Cg.T          # (m_g, c) + const per row
            cid[rows_new[sel]] = old["cluster_id"][cand][d2.argmin(1)]
        upd_new.append(rows_new)
        upd_users.append((lo, hi, clo, chi))

    # exact running updates of the touched clusters, all users at once
    if upd_new:
        rows_new = np.concatenate(upd_new)
        rows_new = rows_new[cid[rows_new] >= 0]                                    # orphans come later
        r_of = np.searchsorted(okey, user[rows_new] * _ID_SPAN + cid[rows_new])    # (m,) old table row
        R, inv = np.unique(r_of, return_inverse=True)
        mm = np.bincount(inv).astype(np.float64)                                   # (T,)
        nn = old["size"][R].astype(np.float64)
        X_new = emb.lookup(beh["item_id"][rows_new]).astype(np.float64)            # (m, d)
        sx = np.zeros((len(R), X_new.shape[1]))
        np.add.at(sx, inv, X_new)
        c_old = old["centroid"][R].astype(np.float64)
        c_new = (nn[:, None] * c_old + sx) / (nn + mm)[:, None]
        d_new = np.bincount(inv, ((X_new - c_new[inv]) ** 2).sum(1), minlength=len(R))
        old["sse"][R] = old["sse"][R] + nn * ((c_old - c_new) ** 2).sum(1) + d_new
        for k in num_keys:
            old[k][R] = (nn * old[k][R] + np.bincount(inv, np.asarray(beh[k][rows_new], np.float64),
                                                      minlength=len(R))) / (nn + mm)
        old["size"][R] = (nn + mm).astype(old["size"].dtype)
        old["centroid"][R] = c_new.astype(np.float32)
        # every row of an updated user (orphans aside): its old table row, through a dense per-user
        # cluster-id -> row table (a searchsorted over all rows cost more than the whole update)
        cand, r_all = _old_rows(upd_users, cid, old["cluster_id"])
        big = (nn + mm) > gamma
        is_big = np.zeros(len(okey), bool)
        is_big[R[big]] = True
        sel_big = is_big[r_all]
        rb, cb = r_all[sel_big], cand[sel_big]
        o = np.argsort(rb, kind="stable")                                          # members in row order
        rb, cb = rb[o], cb[o]
        cuts = run_starts(rb)
        for r, part in zip(rb[cuts], np.split(cb, cuts[1:])):                       # grown past gamma
            keep_old[r] = False
            split_rows.append(part)
            split_tag.append(("resplit", int(old["user_id"][r]), int(old["cluster_id"][r])))
        stats["clusters_resplit"] += int(big.sum())
        # representative: the member nearest the updated centroid (ties: earliest)
        is_small = np.zeros(len(okey), bool)
        is_small[R[~big]] = True
        sel = is_small[r_all]
        mem, r_mem = cand[sel], r_all[sel]                                   # mem ascending
        if len(mem):
            pos = np.searchsorted(R, r_mem)
            Xm = emb.lookup(beh["item_id"][mem]).astype(np.float64)
            dist = ((Xm - c_new[pos]) ** 2).sum(1)
            order = np.argsort(r_mem, kind="stable")                         # by cluster, then member
            r_s, d_s = r_mem[order], dist[order]
            starts = run_starts(r_s)
            d_min = np.repeat(np.minimum.reduceat(d_s, starts), np.diff(np.r_[starts, len(d_s)]))
            if rule == "nearest":
                at_min = np.flatnonzero(d_s == d_min)
                first = at_min[run_starts(r_s[at_min])]                       # earliest member at the min
                best, r_best = mem[order][first], r_s[first]
                old["item_id"][r_best] = beh["item_id"][best]
                a, c = cat.lookup(beh["item_id"][best])
                old["author_id"][r_best], old["category"][r_best] = a, c
            else:                                                            # random | majority: all members
                m_s = mem[order]
                gid = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(r_s)]))
                a, c = cat.lookup(beh["item_id"][m_s])
                r_best = r_s[starts]
                got = pick_ids({"item_id": beh["item_id"][m_s], "author_id": a, "category": c}, gid, starts,
                               d_s, rule, old["user_id"][r_best], old["cluster_id"][r_best], rule_seed)
                for k, v in got.items():
                    old[k][r_best] = v

    # re-splits and new groups: one batched recursive clustering over all of them
    if split_rows:
        rows = np.concatenate(split_rows)
        root = np.repeat(np.arange(len(split_rows)), [len(r) for r in split_rows])
        X = emb.lookup(beh["item_id"][rows])
        keys = root_keys(int(P["seed"]) ^ _RESPLIT_SALT, np.array([t[1] for t in split_tag]),
                         np.array([t[2] + (0 if t[0] == "resplit" else 1 << 40) for t in split_tag]))
        leaf = cluster_sets(X, root, gamma, float(P["exponent"]), int(P["kmeans_iters"]), keys)
        # fresh ids per user, after the user's existing ones, in leaf order
        # leaves are numbered 0..L-1 in (root, tree order); a user's j-th leaf gets next_id[user] + j
        first = np.zeros(int(leaf.max()) + 1, np.int64)
        first[leaf[::-1]] = rows[::-1]                                       # a row of each leaf
        order = np.argsort(user[first], kind="stable")                       # leaves by user, in order
        lu = user[first][order]
        starts = run_starts(lu)
        counts = np.diff(np.r_[starts, len(lu)])
        base = np.array([next_id[int(u)] for u in lu[starts]], np.int64)
        new_id = np.empty(len(first), np.int64)
        new_id[order] = np.repeat(base, counts) + np.arange(len(lu)) - np.repeat(starts, counts)
        cid[rows] = new_id[leaf]
        next_id.update(zip(lu[starts].tolist(), (base + counts).tolist()))
        new_parts.append(_vitems_rows(beh, cid, emb, cat, cross, rows, P))
    if rebuild_rows:
        rows = np.concatenate(rebuild_rows)
        X = emb.lookup(beh["item_id"][rows])
        sub = {k: v[rows] for k, v in beh.items()}
        c_sub = cluster_behaviours(X, sub["user_id"], sub["group"], gamma, float(P["exponent"]),
                                   int(P["kmeans_iters"]), int(P["seed"]))
        cid[rows] = c_sub
        new_parts.append(vitems(sub, c_sub, X, cat, cross, P=P))
    kept = {k: v[keep_old] for k, v in old.items()}
    parts = [p for p in [kept, *new_parts] if len(p["user_id"])] or [kept]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((out["cluster_id"], out["user_id"]))
    out = {k: v[order] for k, v in out.items()}
    out["size"] = out["size"].astype(np.int32)
    out["cluster_id"] = out["cluster_id"].astype(np.int32)
    assert (cid >= 0).all(), "every behaviour before W_new must be in a cluster"
    return out, cid.astype(np.int32), stats


def _old_rows(upd_users: list[tuple], cid: np.ndarray, old_cid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the updated users that are in an old cluster, and that cluster's row in the old table.

    upd_users: (lo, hi, clo, chi) per user: its behaviour rows [lo, hi) and old cluster rows [clo, chi)."""
    rows, r_of = [], []
    for lo, hi, clo, chi in upd_users:
        ids = old_cid[clo:chi].astype(np.int64)
        lut = np.full(int(ids.max()) + 2, -1, np.int64)                    # id -> row; index -1 -> -1
        lut[ids] = np.arange(clo, chi)
        rr = np.arange(lo, hi)
        r = lut[cid[rr]]                                                     # cid -1 (orphan) -> last = -1
        keep = r >= 0
        rows.append(rr[keep])
        r_of.append(r[keep])
    return np.concatenate(rows), np.concatenate(r_of)


def _vitems_rows(beh, cid, emb, cat, cross, rows, P=None):
    X = emb.lookup(beh["item_id"][rows])
    sub = {k: v[rows] for k, v in beh.items()}
    return vitems(sub, cid[rows].astype(np.int32), X, cat, cross, P=P)


def check_incremental(P: dict) -> None:
    """The cluster params an incremental update supports: cluster.method hierarchical only."""
    method = cluster_method(P)
    if method != "hierarchical":
        raise ValueError(f"params cluster.method is {method!r}: incremental clustering (`twinv2 cluster "
                         f"--incremental`) supports only cluster.method: hierarchical (it re-splits clusters "
                         f"grown past gamma); run a full `twinv2 cluster` for the flat ablation")
