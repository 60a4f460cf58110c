"""MLflow: with a tracking URI set, train + evaluate log params, per-step/epoch metrics, the config and
a pyfunc model that scores (user, item, ts) from the stored history and clusters."""
import numpy as np
import pandas as pd
import pytest


@pytest.mark.slow
def test_train_and_evaluate_log_to_mlflow(planted_ro, small_params, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    from pipelines import evaluate, train

    p = small_params
    p["train"].update(epochs=2, log_every=5)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)           # the Default experiment keeps artifacts in ./mlruns of the cwd
    with mlflow.start_run(run_name="stage") as active:           # the orchestration's child run
        train.run(planted_ro, "twinv2", out, params=p)
        evaluate.run(planted_ro, out, params=p)
    run = mlflow.get_run(active.info.run_id)
    assert run.data.params["train.lr"] == "0.005"
    assert "train_loss" in run.data.metrics and "epoch_valid_gauc" in run.data.metrics
    assert "auc" in run.data.metrics and "gauc" in run.data.metrics          # one name each: no test_ copies
    assert "test_auc" not in run.data.metrics and "calibration.ece" not in run.data.metrics
    steps = mlflow.MlflowClient().get_metric_history(active.info.run_id, "train_loss")
    assert len(steps) >= 2
    model = mlflow.pyfunc.load_model(f"runs:/{active.info.run_id}/model")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["user_id", "item_id", "ts"]
    from twinv2.data.store import read_table

    imp = read_table(planted_ro / "validated" / "impressions.parquet", "impressions").to_pandas()
    x = imp[imp.split == "test"][["user_id", "item_id", "ts"]].head(20).reset_index(drop=True)
    got = model.predict(x)["score"].to_numpy()
    from twinv2.training.scoring import RunScorer

    np.testing.assert_allclose(got, RunScorer(out).predict_frame(x)["prob"], rtol=1e-5)
    one = x.assign(user_id=x["user_id"].iloc[0], ts=x["ts"].iloc[0])      # a serving request: one user, one time
    np.testing.assert_allclose(model.predict(one)["score"].to_numpy(), RunScorer(out).predict_frame(one)["prob"],
                               rtol=1e-5, atol=1e-6)
    assert ((got > 0) & (got < 1)).all()
