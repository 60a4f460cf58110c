"""Cluster versions on disk: DIR/clusters/<version>/ (immutable) and the DIR/clusters/CURRENT switch.

    <version>/clusters/part-*.parquet   one row per cluster (user_id, cluster_id, group, size, centroid,
                                        virtual item, sse)
    <version>/members/part-*.parquet    behaviour -> cluster map (user_id, ts, item_id, cluster_id),
                                        rows in the order of the validated behaviours
    <version>/embeddings.npz            the item embeddings the version was built with
    <version>/manifest.json             version, watermark, params, embedding, data version, counts
    <version>/report.json               the report of the run that built it
    CURRENT                             the name of the latest complete version (one line)

A version directory is built under a temporary name and renamed into place only when complete; CURRENT
is replaced atomically afterwards, so a reader (or a crash) never sees a half-written version.
Sharded runs write DIR/clusters/.pending/<version>/shard-IIIII-of-NNNNN/ parts first (see
pipelines/cluster.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from twinv2.io import atomic_path, read_json

CURRENT = "CURRENT"


def clusters_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / "clusters"


def version_dir(data_dir: str | Path, version: str) -> Path:
    return clusters_root(data_dir) / version


def pending_dir(data_dir: str | Path, version: str) -> Path:
    return clusters_root(data_dir) / ".pending" / version


def is_complete(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "clusters").is_dir() and (path / "members").is_dir()


def current_version(data_dir: str | Path) -> str | None:
    p = clusters_root(data_dir) / CURRENT
    if not p.exists():
        return None
    name = p.read_text().strip()
    return name or None


def switch_current(data_dir: str | Path, version: str) -> None:
    """Point CURRENT at a complete version (atomic rename)."""
    vd = version_dir(data_dir, version)
    if not is_complete(vd):
        raise ValueError(f"{vd}: refusing to switch CURRENT to an incomplete version (no manifest.json)")
    with atomic_path(clusters_root(data_dir) / CURRENT) as tmp:
        tmp.write_text(version + "\n")


def list_versions(data_dir: str | Path) -> list[str]:
    root = clusters_root(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p))


@dataclass
class ClusterVersion:
    version: str
    path: Path
    manifest: dict
    clusters: pa.Table
    members: pa.Table


def resolve(data_dir: str | Path, version: str | None = None) -> Path:
    if version is None:
        version = current_version(data_dir)
        if version is None:
            raise FileNotFoundError(f"{clusters_root(data_dir) / CURRENT}: no cluster version yet; "
                                    f"run `twinv2 cluster --data {data_dir}` first")
    vd = version_dir(data_dir, version)
    if not is_complete(vd):
        raise FileNotFoundError(f"{vd}: cluster version {version!r} is missing or incomplete "
                                f"(expected clusters/, members/ and manifest.json)")
    return vd


def read_parts(path: Path, users: np.ndarray | None = None, columns: list[str] | None = None) -> pa.Table:
    files = sorted(str(f) for f in path.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path}: no part-*.parquet files")
    dset = ds.dataset(files, format="parquet")
    flt = None if users is None else ds.field("user_id").isin(pa.array(np.asarray(users, np.int64)))
    return dset.to_table(filter=flt, columns=columns)


def load_clusters(data_dir: str | Path, version: str | None = None, users: np.ndarray | None = None,
                  members: bool = True) -> ClusterVersion:
    """A cluster version (None = CURRENT): its manifest, cluster table and behaviour -> cluster map,
    optionally only for some users."""
    vd = resolve(data_dir, version)
    return ClusterVersion(vd.name, vd, read_json(vd / "manifest.json"), read_parts(vd / "clusters", users),
                          read_parts(vd / "members", users) if members else pa.table({}))


def write_part(path: Path, table: pa.Table) -> None:
    """One part file (row groups small enough for user_id min/max pruning)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=65_536)
