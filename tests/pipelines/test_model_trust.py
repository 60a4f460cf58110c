"""The trust boundary of a logged model (docs/architecture.md, "Trust boundary"): the MLflow pyfunc wrapper is a
cloudpickle (loading it runs code), but everything the model is made of, the weights included, loads without
unpickling code: *.pt with torch.load(weights_only=True), *.npz with allow_pickle=False; and RunScorer on the
downloaded artifacts scores like the pyfunc, so an untrusted store can be used without the pickle."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

SMALL = {"embed_dim": 8, "side_dim": 4, "cross_dim": 2, "n_heads": 1, "head_dim": 4, "din_len": 16,
         "din_att_mlp": [8], "mlp": [8], "short_len": 4}


@pytest.mark.slow
def test_logged_model_weights_load_without_unpickling_code(tiny_validated_ro, params, tmp_path, monkeypatch, capfd):
    mlflow = pytest.importorskip("mlflow")
    import torch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    from pipelines import train

    p = copy.deepcopy(params)
    p["model"].update(SMALL)
    p["train"].update(epochs=1, batch_size=512, progress=False, num_workers=0, device="cpu")
    out = tmp_path / "run"
    with mlflow.start_run() as active:
        train.run(tiny_validated_ro, "din", out, params=p)
    art = Path(mlflow.artifacts.download_artifacts(f"runs:/{active.info.run_id}/model", dst_path=str(tmp_path / "dl")))
    files = [f for f in art.rglob("*") if f.is_file()]
    pts = [f for f in files if f.suffix == ".pt"]
    assert [f.name for f in pts] == ["model.pt"], files
    for f in pts:
        sd = torch.load(f, map_location="cpu", weights_only=True)          # refuses anything but tensors & co
        assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    for f in (f for f in files if f.suffix == ".npz"):
        with np.load(f, allow_pickle=False) as z:
            for k in z.files:
                assert z[k].dtype != object, (f, k)
    pickles = sorted(f.name for f in files if f.suffix in (".pkl", ".pickle"))
    assert pickles == ["python_model.pkl"], pickles                       # the one pickle: the pyfunc wrapper
    for f in (out / "checkpoints").glob("*.pt"):
        torch.load(f, map_location="cpu", weights_only=True)

    (run_dir,) = {f.parent for f in pts}
    from twinv2.data.store import read_table
    from twinv2.training.scoring import RunScorer

    imp = read_table(tiny_validated_ro / "validated" / "impressions.parquet", "impressions").to_pandas()
    x = imp[imp.split == "test"][["user_id", "item_id", "ts"]].head(8).reset_index(drop=True)
    safe = RunScorer(run_dir, data=tiny_validated_ro).predict_frame(x)["prob"]
    np.testing.assert_allclose(safe, RunScorer(out).predict_frame(x)["prob"], rtol=1e-5)

    # the evaluate stage's progress bar (steps), plain lines in a log
    from pipelines import evaluate

    monkeypatch.delenv("TWINV2_PROGRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    p["evaluate"].update(diversity_users=5, diversity_pool=20, plots=False, progress=True)
    capfd.readouterr()
    evaluate.run(tiny_validated_ro, out, params=p)
    err = capfd.readouterr().err
    assert "evaluate: 4/4 steps" in err and "\r" not in err, err
