"""After an incremental clustering step the watermark W moves past early train impressions: those rows are
excluded (and counted) for every model alike, so TWIN-V2 never reads clusters built after its sample and all
models train on the same samples."""
import json
import shutil

import numpy as np

from pipelines import cluster
from twinv2.data.store import read_table
from twinv2.training.world import load_world


def test_train_rows_before_the_new_watermark_are_excluded_and_counted(clustered_ro, tmp_path, params):
    data = tmp_path / "w"
    shutil.copytree(clustered_ro, data)
    meta = json.loads((data / "validated" / "meta.json").read_text())
    new_w = int(meta["history_end_ms"]) + 24 * 3600 * 1000
    cluster.run(data=data, incremental=True, params=params, watermark=new_w)

    imp = read_table(data / "validated" / "impressions.parquet", "impressions").to_pandas()
    tr = imp[imp["split"] == "train"]
    n_before = int((tr["ts"] < new_w).sum())
    assert 0 < n_before < len(tr)

    raw_world = load_world(data, need_clusters=False)
    clu_world = load_world(data, need_clusters=True)
    assert raw_world.sample_floor == clu_world.sample_floor == new_w
    s_raw, s_clu = raw_world.samples("train"), clu_world.samples("train")
    assert raw_world.excluded["train"] == clu_world.excluded["train"] == n_before
    assert len(s_raw) == len(s_clu) == len(tr) - n_before
    assert np.all(s_clu.ts >= new_w) and np.all(s_raw.ts >= new_w)
