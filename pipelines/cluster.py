"""Stage `cluster`: every user's life-cycle history -> a new immutable cluster version.

    run(data, incremental=False, shard=None, params=None, embeddings=None, watermark=None) -> report
    finalize(data, version, params=None) -> report

Versions are content-addressed: version = "w<W>-<hash of (data version, embedding version, cluster
params, base version)>", so N shard tasks (one Airflow task per shard) compute the same name on their
own, and a rerun with the same inputs finds its version already built (idempotent retries).

Unsharded: chunks of complete users are clustered by a process pool (cluster.n_jobs), parts are
written into a temporary directory renamed to clusters/<version>/ when complete, then CURRENT switches.
Sharded (`shard="I/N"`): the users of shard I go to clusters/.pending/<version>/shard-IIIII-of-NNNNN/
(written atomically); when all N parts exist, the shard that completes the set (or an explicit
`finalize`, e.g. the DAG's last task) hard-links the parts into the version directory, writes the
manifest and the merged report, and switches CURRENT. finalize is idempotent.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from twinv2 import progress
from twinv2.clustering import chunk as C
from twinv2.clustering import store
from twinv2.clustering.embeddings import ItemEmbedding, bootstrap, from_checkpoint, load_npz
from twinv2.config import load_params
from twinv2.data.schema import DatasetPaths
from twinv2.data.store import iter_user_chunks, parse_shard, read_table
from twinv2.errors import DataError
from twinv2.io import atomic_dir, read_json, write_json

EMB_FILE = "embeddings.npz"
# parameters that change how a version is computed, never what it holds: left out of its name
EXECUTION_ONLY = {"n_jobs", "chunk_rows", "finalize_last_shard", "n_shards", "progress"}
# switches added after versions existed: at their default (today's behaviour) they are left out of the name,
# so a version built before the switch keeps its name (the manifest records every param)
NAME_DEFAULTS = {"virtual_ids": "nearest", "method": "hierarchical"}


def name_params(P: dict) -> dict:
    """The cluster params that name a version."""
    return {k: v for k, v in P.items()
            if k not in EXECUTION_ONLY and not (k in NAME_DEFAULTS and v == NAME_DEFAULTS[k])}


# ---------------------------------------------------------------- inputs


def _validated(data: Path) -> tuple[Path, dict]:
    paths = DatasetPaths(data)
    val = paths.stage("validated")
    if not paths.behaviors("validated").exists():
        raise FileNotFoundError(f"{paths.behaviors('validated')}: no validated behaviours; "
                                f"run `twinv2 validate --data {data}` first")
    meta_p = val / "meta.json"
    meta = read_json(meta_p) if meta_p.exists() else {}
    return val, meta


def data_version(val: Path) -> str:
    """sha256 over the validated files (relative path + content), 16 hex digits."""
    h = hashlib.sha256()
    for f in sorted(p for p in val.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(val)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _load_external_embeddings(spec: str) -> ItemEmbedding:
    """An item_embeddings.npz, a run directory holding one, a trained model's weights (RUN/model.pt or
    RUN/checkpoints/epoch-NNNN.pt), or an MLflow URI whose artifacts hold an item_embeddings.npz."""
    if "://" in spec or spec.startswith(("runs:/", "models:/")):
        import mlflow

        from twinv2.io import make_system_temp_dir

        dest = make_system_temp_dir("twinv2-emb-")           # stale ones of killed runs are removed first
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(dest)))
            found = [local] if local.is_file() else sorted(local.rglob("item_embeddings.npz"))
            if not found:
                raise FileNotFoundError(f"{spec}: the MLflow artifacts hold no item_embeddings.npz")
            return load_npz(found[0], source=spec)                # read whole: the download can go
        finally:
            shutil.rmtree(dest, ignore_errors=True)
    if Path(spec).suffix == ".pt":
        return from_checkpoint(spec)
    return load_npz(spec, source=str(spec))


def _bootstrap(data: Path, val: Path, W: int, P: dict, dv: str) -> ItemEmbedding:
    """Bootstrap embedding, cached per (data version, W, params) under clusters/.embeddings/. The shards of one
    build run at once (Airflow's mapped tasks, `--shard` processes): a lock file beside the cache lets the first
    compute it while the others wait and then load it, instead of each computing the same table."""
    from filelock import FileLock

    cfg = {"data": dv, "W": W, "dim": P["embedding_dim"], "seed": P["seed"], "window": P.get("cooc_window", 5)}
    version = "bootstrap-" + _digest(cfg)[:16]
    cache = store.clusters_root(data) / ".embeddings" / f"{version}.npz"
    if cache.exists():
        return load_npz(cache, source="bootstrap")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if cache.exists():                              # another shard computed it while this one waited
            return load_npz(cache, source="bootstrap")
        return _compute_bootstrap(val, W, P, version, cache)


def _compute_bootstrap(val: Path, W: int, P: dict, version: str, cache: Path) -> ItemEmbedding:
    items = read_table(val / "items.parquet", "items")

    def chunks():
        for t in iter_user_chunks(val / "behaviors", columns=["item_id", "ts"]):
            keep = t.column("ts").to_numpy() < W
            yield {"user_id": t.column("user_id").to_numpy()[keep], "item_id": t.column("item_id").to_numpy()[keep]}

    emb = bootstrap(chunks(), items.column("item_id").to_numpy(), items.column("category").to_numpy(),
                    int(P["embedding_dim"]), int(P["seed"]), version, int(P.get("cooc_window", 5)))
    emb.save(cache)
    return emb


# ---------------------------------------------------------------- workers


_CTX: dict = {}


def _init_worker(ctx: dict, limit_threads: bool = True) -> None:
    """A worker's start: the run's context, and one BLAS/OpenMP thread (n_jobs workers use n_jobs cores;
    the k-means matmuls are small, extra threads only add overhead)."""
    if limit_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    _CTX.clear()
    _CTX.update(ctx)


def _work(table: pa.Table) -> tuple[pa.Table, pa.Table, dict]:
    """Cluster one chunk of complete users (full or incremental)."""
    ctx = _CTX
    P, cross = ctx["P"], ctx["cross"]
    beh = C.prepare(table, ctx["W"], P["group_edges"], cross, ctx["extra"])
    if ctx.get("base") is None:
        cl, cid = C.cluster_chunk(beh, ctx["emb"], ctx["cat"], P, cross)
        inc = {}
    else:
        from twinv2.clustering.incremental import update_chunk

        users = np.unique(beh["user_id"])
        old = store.read_parts(Path(ctx["base"]) / "clusters", users)
        old_m = store.read_parts(Path(ctx["base"]) / "members", users)
        cl, cid, inc = update_chunk(beh, C.cluster_columns(old), {c: old_m.column(c).to_numpy() for c in
                                    old_m.column_names}, ctx["emb"], ctx["cat"], P, cross, ctx["W_old"],
                                    rebuild_all=ctx["rebuild_all"])
    st = C.chunk_stats(cl, beh, cid, int(P["gamma"]))
    st.update(inc)
    return C.cluster_table(cl, cross), C.members_table(beh, cid), st


def _merge_stats(stats: list[dict]) -> dict:
    out: dict = {}
    for st in stats:
        for k, v in st.items():
            if k == "max_cluster_size":
                out[k] = max(out.get(k, 0), v)
            elif k == "size_hist":                                       # sizes 1..; flat: beyond gamma
                a, b = np.asarray(out.get(k, []), np.int64), np.asarray(v, np.int64)
                n = max(len(a), len(b))
                out[k] = (np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b)))).tolist()
            else:
                out[k] = out.get(k, 0) + v
    return out


def _process(val: Path, ctx: dict, shard: tuple[int, int] | None, out_dir: Path, n_jobs: int,
             chunk_rows: int) -> dict:
    """Stream user chunks through the workers; write parts in chunk order. Returns merged stats."""
    columns = ["item_id", "ts", "play_ms", "duration_ms", *ctx["cross"], *ctx["extra"]]
    chunks = iter_user_chunks(val / "behaviors", columns=columns, shard=shard, batch_rows=chunk_rows)
    tag = f"{shard[0]:05d}" if shard else "00000"
    stats, i = [], 0
    total = None if shard else _behaviour_rows(val / "behaviors")   # a shard's share is unknown up front
    bar = progress.bar(total=total, desc=f"cluster{f' shard {shard[0]}/{shard[1]}' if shard else ''}",
                       unit="beh", unit_scale=True, section=ctx["P"])

    def write(res, n_rows):
        nonlocal i
        ct, mt, st = res
        if n_rows:
            bar.update(n_rows)
        store.write_part(out_dir / "clusters" / f"part-{tag}-{i:05d}.parquet", ct)
        store.write_part(out_dir / "members" / f"part-{tag}-{i:05d}.parquet", mt)
        stats.append(st)
        i += 1

    try:
        if n_jobs <= 1:                                                      # in this process: limits undone after
            from threadpoolctl import threadpool_limits

            _init_worker(ctx, limit_threads=False)
            with threadpool_limits(1):
                for t in chunks:
                    write(_work(t), len(t))
        else:
            with ProcessPoolExecutor(n_jobs, initializer=_init_worker, initargs=(ctx,)) as pool:
                pending = []
                for t in chunks:
                    pending.append((pool.submit(_work, t), len(t)))
                    while len(pending) >= 2 * n_jobs:                        # bounded memory: few chunks in flight
                        f, n = pending.pop(0)
                        write(f.result(), n)
                for f, n in pending:
                    write(f.result(), n)
    finally:
        bar.close()
    if i == 0:                                                           # keep the schemas even when empty
        empty = {k: np.zeros(0) for k in ["user_id", "item_id", "ts", "play_ms", "duration_ms", *ctx["cross"]]}
        beh = {**empty, "user_id": np.zeros(0, np.int64), "item_id": np.zeros(0, np.int64),
               "ts": np.zeros(0, np.int64), "group": np.zeros(0, np.int8), "completion": np.zeros(0)}
        cl = C.vitems(beh, np.zeros(0, np.int32), np.zeros((0, ctx["emb"].dim), np.float32), ctx["cat"], ctx["cross"])
        write((C.cluster_table(cl, ctx["cross"]), C.members_table(beh, np.zeros(0, np.int32)),
               C.chunk_stats(cl, beh, np.zeros(0, np.int32), int(ctx["P"]["gamma"]))), 0)
    return _merge_stats(stats)


def _behaviour_rows(path: Path) -> int | None:
    """Rows of the behaviour part files (Parquet footers only), for the progress bar's total."""
    import pyarrow.parquet as pq

    from twinv2.data.store import behavior_files

    try:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in behavior_files(path))
    except Exception:  # noqa: BLE001 - only a progress total; the reading itself reports errors
        return None


# ---------------------------------------------------------------- stage


def run(data, incremental: bool = False, shard: str | None = None, params: dict | None = None,
        embeddings: str | None = None, watermark: int | None = None) -> dict:
    t0 = time.time()
    params = params or load_params()
    P = params["cluster"]
    C.virtual_ids(P)                                                     # clear errors before any work
    if incremental:
        from twinv2.clustering.incremental import check_incremental

        check_incremental(P)
    else:
        C.cluster_method(P)
    data = Path(data)
    val, meta = _validated(data)
    shard_t = parse_shard(shard)
    timings: dict[str, float] = {}

    base_dir, W_old, base_manifest = None, None, None
    if incremental:
        base_dir = store.resolve(data)                                   # CURRENT, or a clear error
        base_manifest = read_json(base_dir / "manifest.json")
        W_old = int(base_manifest["watermark"])
        W = watermark if watermark is not None else (P.get("watermark") or W_old + int(P.get("incremental_step_ms", 86_400_000)))
        W = int(W)
        if W <= W_old:
            raise ValueError(f"--watermark {W}: an incremental run needs a watermark after the current "
                             f"version's ({W_old}, {base_dir.name})")
    else:
        W = watermark if watermark is not None else P.get("watermark")
        if W is None:
            if "history_end_ms" not in meta:
                raise DataError(f"{val / 'meta.json'}: no history_end_ms to use as the clustering watermark; "
                                "pass --watermark MS or set cluster.watermark")
            W = meta["history_end_ms"]
        W = int(W)

    t = time.time()
    dv = data_version(val)
    if embeddings:
        emb = _load_external_embeddings(str(embeddings))
    elif incremental:
        emb = load_npz(base_dir / EMB_FILE, source=base_manifest["embedding"]["source"])
    else:
        emb = _bootstrap(data, val, W, P, dv)
    timings["embedding_s"] = time.time() - t

    items = read_table(val / "items.parquet", "items")
    beh_cols = C.BEHAVIOUR_COLUMNS
    import pyarrow.parquet as pq
    from twinv2.data.store import behavior_files
    names = pq.read_schema(behavior_files(val / "behaviors")[0]).names
    missing = [c for c in beh_cols if c not in names]
    if missing:
        raise DataError(f"{val / 'behaviors'}: lacks columns {missing}; expected {beh_cols}")
    cross = C.cross_columns(names)
    extra = ["true_interest"] if "true_interest" in names else []

    rebuild_all = bool(incremental and base_manifest["embedding"]["version"] != emb.version)
    ident = {"W": W, "data": dv, "embedding": emb.version,
             "params": name_params(P),
             "base": base_dir.name if base_dir is not None else None}
    version = f"w{W}-{_digest(ident)[:10]}"
    manifest = {"version": version, "watermark": W, "params": P, "data_version": dv,
                "embedding": {"source": emb.source, "version": emb.version, "dim": emb.dim},
                "incremental": bool(incremental), "base_version": ident["base"], "watermark_old": W_old,
                "cross_features": cross, "created_s": time.time()}
    ctx = {"P": P, "W": W, "cross": cross, "extra": extra, "emb": emb, "cat": C.Catalogue.from_table(items),
           "base": str(base_dir) if base_dir is not None else None, "W_old": W_old, "rebuild_all": rebuild_all}
    n_jobs = int(P.get("n_jobs", 1) or 1)
    chunk_rows = int(P.get("chunk_rows", 200_000))

    final = store.version_dir(data, version)
    if store.is_complete(final):                                          # same inputs: already built
        return _publish_existing(data, version)

    t = time.time()
    if shard_t is None:
        with atomic_dir(final) as tmp:
            st = _process(val, ctx, None, tmp, n_jobs, chunk_rows)
            timings["cluster_s"] = time.time() - t
            timings["total_s"] = time.time() - t0
            report = _report(st, manifest, timings)
            emb.save(tmp / EMB_FILE)
            write_json(tmp / "report.json", report)
            write_json(tmp / "manifest.json", {**manifest, "counts": _counts(st)})
        store.switch_current(data, version)
        write_json(data / "reports" / "cluster.json", report)
        return report

    i, n = shard_t
    pend = store.pending_dir(data, version)
    with atomic_dir(pend / f"shard-{i:05d}-of-{n:05d}") as tmp:
        st = _process(val, ctx, shard_t, tmp, 1, chunk_rows)            # one shard = one worker (task)
        timings["cluster_s"] = time.time() - t
        write_json(tmp / "stats.json", {"stats": st, "timings": timings})
    write_json(pend / "manifest.json", manifest)
    if emb is not None and not (pend / EMB_FILE).exists():
        emb.save(pend / EMB_FILE)
    done = sorted(pend.glob(f"shard-*-of-{n:05d}"))
    if len(done) == n and P.get("finalize_last_shard", True):
        return finalize(data, version, params)
    report = {"version": version, "shard": f"{i}/{n}", "pending": True, "shards_done": len(done),
              **_counts(st), "watermark": W, "timings": timings,
              "summary": f"cluster shard {i}/{n} of {version}: {st.get('n_users', 0)} users, "
                         f"{st.get('n_clusters', 0)} clusters ({len(done)}/{n} shards done)"}
    return report


def finalize(data, version: str, params: dict | None = None) -> dict:
    """Publish a sharded version once all its shard parts exist; switch CURRENT. Idempotent."""
    data = Path(data)
    final = store.version_dir(data, version)
    if store.is_complete(final):
        return _publish_existing(data, version)
    pend = store.pending_dir(data, version)
    if not (pend / "manifest.json").exists():
        raise FileNotFoundError(f"{pend}: no pending parts of cluster version {version!r}")
    manifest = read_json(pend / "manifest.json")
    shards = sorted(pend.glob("shard-*-of-*"))
    n = int(shards[0].name.split("-of-")[1]) if shards else 0
    if not shards or len(shards) != n:
        raise DataError(f"{pend}: {len(shards)} of {n or '?'} shard parts present; run the missing "
                        f"`twinv2 cluster --shard I/{n or 'N'}` tasks first")
    stats, timings = [], {"cluster_s": 0.0}
    try:
        with atomic_dir(final) as tmp:
            for sd in shards:
                s = read_json(sd / "stats.json")
                stats.append(s["stats"])
                timings["cluster_s"] += s["timings"].get("cluster_s", 0.0)
                for sub in ("clusters", "members"):
                    (tmp / sub).mkdir(exist_ok=True)
                    for f in sorted((sd / sub).glob("part-*.parquet")):
                        _link(f, tmp / sub / f.name)
            shutil.copy2(pend / EMB_FILE, tmp / EMB_FILE)
            st = _merge_stats(stats)
            report = _report(st, manifest, timings)
            report["n_shards"] = n
            write_json(tmp / "report.json", report)
            write_json(tmp / "manifest.json", {**manifest, "counts": _counts(st), "n_shards": n})
    except OSError:
        if not store.is_complete(final):                                  # a concurrent finalize won
            raise
    shutil.rmtree(pend, ignore_errors=True)
    return _publish_existing(data, version)


def _publish_existing(data: Path, version: str) -> dict:
    store.switch_current(data, version)
    report = read_json(store.version_dir(data, version) / "report.json")
    write_json(data / "reports" / "cluster.json", report)
    return report


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _counts(st: dict) -> dict:
    return {k: st.get(k, 0) for k in ("n_users", "n_behaviors", "n_clusters", "max_cluster_size")}


def _report(st: dict, manifest: dict, timings: dict) -> dict:
    nb, nc = st.get("n_behaviors", 0), st.get("n_clusters", 0)
    rep = {**_counts(st), "version": manifest["version"], "watermark": manifest["watermark"],
           "compression_ratio": nb / nc if nc else 0.0, "mean_inertia": st.get("sse", 0.0) / nb if nb else 0.0,
           "size_hist": st.get("size_hist", []), "embedding": manifest["embedding"],
           "data_version": manifest["data_version"], "incremental": manifest["incremental"],
           "base_version": manifest["base_version"], "timings": timings}
    if st.get("purity_n"):
        rep["purity"] = st["purity_hits"] / st["purity_n"]
    if manifest["incremental"]:
        rep["incremental_stats"] = {k: st.get(k, 0) for k in ("users_updated", "users_rebuilt", "users_new",
                                                               "new_behaviors", "clusters_resplit")}
    per_s = nb / timings["cluster_s"] if timings.get("cluster_s") else 0.0
    rep["behaviors_per_s"] = per_s
    rep["summary"] = (f"cluster {manifest['version']}: {rep['n_users']} users, {nb} behaviours -> {nc} clusters "
                      f"(x{rep['compression_ratio']:.1f}, max size {rep['max_cluster_size']}, "
                      f"mean inertia {rep['mean_inertia']:.4f}"
                      + (f", purity {rep['purity']:.3f}" if "purity" in rep else "") + f"); CURRENT -> {manifest['version']}")
    return rep
