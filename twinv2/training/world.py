"""Everything a run reads from a dataset directory, loaded once: items, impressions, the behaviour
store (CSR by user), the cluster version (for models whose long part is clusters) and the vocabulary.

    w = load_world(DIR, need_clusters=True)          # DIR/validated/* and DIR/clusters/CURRENT
    samples = w.samples("train")                     # (user, position) addressing of the train split
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from twinv2.data.schema import DatasetPaths
from twinv2.data.store import UserHistories, open_behaviors, read_table
from twinv2.training.samples import (RowFeatures, Samples, SampleSet, Vocab, cluster_features, cluster_mix,
                                     extra_cross_columns, make_samples, raw_features)


@dataclass
class World:
    data: Path
    meta: dict
    items: pd.DataFrame
    impressions: pd.DataFrame
    hist: UserHistories
    vocab: Vocab
    raw: RowFeatures
    clusters: RowFeatures | None
    cluster_version: str | None
    watermark: int | None
    # Samples before the watermark of the newest cluster version cannot be read by TWIN-V2 without leakage
    # (its clusters summarise behaviours up to W). Train/valid rows before it are excluded for EVERY model,
    # so all models learn from the same samples; the counts are reported (never dropped silently).
    sample_floor: int | None = None
    excluded: dict | None = None
    pinned_version: str | None = None      # train.cluster_version asked for (also by models without clusters)
    cache: dict = field(default_factory=dict, repr=False)   # built once on first use: feedback, by_size

    def samples(self, split: str | None = None, impressions: pd.DataFrame | None = None) -> Samples:
        imp = impressions if impressions is not None else self.impressions
        if split is not None:
            imp = imp[imp["split"] == split]
        if split in ("train", "valid") and self.sample_floor is not None:
            before = imp["ts"].to_numpy() < self.sample_floor
            if self.excluded is None:
                self.excluded = {}
            self.excluded[split] = int(before.sum())
            imp = imp[~before]
        s = make_samples(imp.reset_index(drop=True), self.hist, self.vocab, self.clusters, self.watermark)
        fb = self.feedback()
        s.fb_n, s.fb_k = fb.counts(s.user, s.ts)
        s.fb_prior = fb.prior(s.ts)                 # p0 from labels strictly before each sample
        return s

    def feedback(self):
        """The train split's labels by (user, ts) (twinv2.training.feedback.Feedback), built once."""
        from twinv2.training.feedback import Feedback

        if "feedback" not in self.cache:
            self.cache["feedback"] = Feedback.from_impressions(self.impressions)
        return self.cache["feedback"]

    def dataset(self, samples: Samples, model) -> SampleSet:
        J = int(getattr(model, "mix_slots", 0) or 0) if model.long_source == "clusters" else 0
        if J:
            self.attach_mix(J)
        clusters = self.clusters
        if clusters is not None and model.long_source == "clusters" and getattr(model, "cluster_order", "time") == "size":
            mix, rows = self.cache.get("by_size", (None, None))
            if rows is None or mix is not clusters.mix:          # rebuilt when attach_mix replaced the mixes
                self.cache["by_size"] = (clusters.mix, clusters.by_size())
            clusters = self.cache["by_size"][1]
        return SampleSet(samples, self.raw, self.vocab, model.long_source, model.long_len, model.short_len,
                         clusters, self.watermark, bool(getattr(model, "watermark_gap", False)), J)

    def attach_mix(self, slots: int) -> None:
        """Compute the virtual-item mixes of the cluster version (its members joined to the raw store) once."""
        if self.clusters is None:
            raise ValueError("virtual_mix needs a cluster version; this world was loaded without clusters")
        if self.clusters.mix is not None and self.clusters.mix["item"][0].shape[1] == int(slots):
            return
        from twinv2.clustering.store import load_clusters

        members = load_clusters(self.data, self.cluster_version).members.to_pandas()
        self.clusters.mix = cluster_mix(self.clusters, members, self.raw, self.vocab, int(slots), self.watermark)

    def item_embedding(self):
        """The item embedding the cluster version was built with (DIR/clusters/<version>/embeddings.npz:
        the co-occurrence bootstrap of behaviours before its watermark, or a trained model's table), for
        the version this world reads or, for models without clusters, the CURRENT one; None if none."""
        from twinv2.clustering.embeddings import load_npz
        from twinv2.clustering.store import current_version

        version = self.cluster_version or self.pinned_version or current_version(self.data)
        path = self.data / "clusters" / str(version) / "embeddings.npz" if version else None
        return load_npz(path) if path is not None and path.exists() else None

    def user_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(user ids, life-cycle length = behaviours before the history end) of every user with history."""
        end = self.meta.get("history_end_ms")
        if end is None:
            return self.hist.user_ids, self.hist.lengths()
        ts = self.hist.cols["ts"]
        before = np.add.reduceat((ts < end).astype(np.int64), self.hist.offsets[:-1]) if len(ts) else np.zeros(0)
        before = np.where(self.hist.lengths() > 0, before, 0)
        return self.hist.user_ids, before


def load_cluster_version(data: str | Path, version: str | None = None) -> tuple[str, dict, pd.DataFrame]:
    """(version, manifest, cluster table) of DIR/clusters/<version> (None: CURRENT)."""
    from twinv2.clustering.store import load_clusters

    cv = load_clusters(data, version, members=False)
    return cv.version, cv.manifest, cv.clusters.to_pandas()


def load_world(data: str | Path, need_clusters: bool = False, cluster_version: str | None = None,
               vocab: Vocab | None = None, features: dict | None = None, stage: str = "validated") -> World:
    """Load DIR/<stage>/ (validated by default) and, if needed, a cluster version."""
    paths = DatasetPaths(data)
    for p in (paths.items(stage), paths.impressions(stage), paths.behaviors(stage)):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: expected the validated dataset; run `twinv2 validate "
                                    f"--data {data}` first")
    meta_path = paths.stage(stage) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    items = read_table(paths.items(stage), "items").to_pandas()
    imp = read_table(paths.impressions(stage), "impressions").to_pandas()
    for col in ("user_id", "item_id", "ts", "label", "split"):
        if col not in imp.columns:
            raise ValueError(f"{paths.impressions(stage)}: column {col!r} missing; expected user_id, item_id, ts, "
                             f"label, split")
    names = open_behaviors(paths.behaviors(stage)).schema.names
    extras = extra_cross_columns(names)
    hist = UserHistories.load(paths.behaviors(stage), columns=["item_id", "ts", "play_ms", "duration_ms", *extras])
    if vocab is None:
        vocab = Vocab.build(items, {c: hist.cols[c] for c in extras}, features)
    clusters, version, watermark = None, None, None
    if need_clusters:
        version, manifest, table = load_cluster_version(data, cluster_version)
        watermark = manifest.get("watermark")
        clusters = cluster_features(table, vocab)
    return World(Path(data), meta, items, imp, hist, vocab, raw_features(hist, vocab), clusters, version,
                 None if watermark is None else int(watermark), _sample_floor(data, watermark),
                 pinned_version=cluster_version)


def _sample_floor(data: str | Path, watermark: int | None) -> int | None:
    """The watermark of the cluster version training reads (the CURRENT one for models without clusters),
    so that every model is trained on the same samples."""
    if watermark is not None:
        return int(watermark)
    from twinv2.clustering.store import current_version

    version = current_version(data)
    if version is None:
        return None
    manifest = Path(data) / "clusters" / version / "manifest.json"
    if not manifest.exists():
        return None
    w = json.loads(manifest.read_text()).get("watermark")
    return None if w is None else int(w)
