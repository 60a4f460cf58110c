"""MLflow for the train stages (pipelines.train for the neural models, pipelines.train_gbdt for the trees).

    training_run(out, config, params, is_main)   context manager: a Tracking that logs into the active run, the
                                                 run MLFLOW_RUN_ID names, or an own run when tracking is wanted
                                                 (pipelines.tracking.tracking_wanted); a NoTracking otherwise
    Tracking.step / .epoch / .finish             per-step and per-epoch metrics; the report, the run's files and
                                                 the pyfunc model at the end
    flat(d)                                      a nested params dict as MLflow's dotted param names
    save_state_dict(path, sd)                    a state dict as CPU tensors, written atomically (model.pt)
    log_pyfunc(mlflow, out, world)               the run as an MLflow pyfunc model (pipelines.register too)

Own and bound runs log system metrics (CPU, memory; GPU where present) and the validated data as a dataset
input. Nothing here imports a train stage: both stages import it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from twinv2.io import atomic_path


def save_state_dict(path: Path, sd: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in sd.items()}, tmp)


class NoTracking:
    def step(self, step: int, metrics: dict) -> None:
        pass

    def epoch(self, epoch: int, metrics: dict) -> None:
        pass

    def finish(self, report: dict, model, world) -> None:
        pass


class Tracking(NoTracking):
    def __init__(self, mlflow, out: Path):
        self.mlflow, self.out = mlflow, out

    def step(self, step, metrics):
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def epoch(self, epoch, metrics):
        self.mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and v is not None and k != "epoch"}, step=epoch)

    def finish(self, report, model, world):
        mlflow = self.mlflow
        mlflow.log_metrics({k: float(report[k]) for k in ("best_valid_gauc", "best_epoch", "epochs_run", "wall_s")
                            if isinstance(report.get(k), (int, float))})
        for f in ("config.json", "train_metrics.json", "item_embeddings.npz", "vocab.npz"):
            if (self.out / f).exists():
                mlflow.log_artifact(str(self.out / f))
        log_pyfunc(mlflow, self.out, world)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


@contextmanager
def training_run(out: Path, config: dict, params: dict, is_main: bool):
    from pipelines import tracking

    if not (is_main and tracking.tracking_wanted()):
        yield NoTracking()
        return
    import mlflow

    own = mlflow.active_run() is None
    if own:
        tracking.use_store()                 # $MLFLOW_TRACKING_URI, else the default store; experiment twinv2
        if not os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"):
            mlflow.set_system_metrics_sampling_interval(2)   # short runs still get CPU/memory samples
        rid = os.environ.get("MLFLOW_RUN_ID")
        run = (mlflow.start_run(run_id=rid, log_system_metrics=True) if rid else
               mlflow.start_run(run_name=f"train-{config['model']}", log_system_metrics=True))
    try:
        params_flat = flat({"train": params.get("train", {}), "model": params.get("model", {})})
        run_id = mlflow.active_run().info.run_id
        existing = mlflow.get_run(run_id).data.params
        mlflow.log_params({k: v for k, v in params_flat.items() if k not in existing})
        mlflow.set_tags({"stage": "train", "model": config["model"], "cluster_version": str(config["cluster_version"]),
                         "run_dir": str(out.resolve())})
        tracking.log_dataset(tracking.client(), run_id, config["data"], "train")
        mlflow.log_dict(config, "config.json")
        yield Tracking(mlflow, out)
    finally:
        if own:
            mlflow.end_run()


def pyfunc_class():
    """The MLflow pyfunc wrapper of a run (defined on demand so that importing this module stays light)."""
    import mlflow

    class TwinV2Model(mlflow.pyfunc.PythonModel):
        """Input: a DataFrame of user_id, item_id[, ts]; output: the click probability of each row,
        scored from the stored history and clusters of the dataset directory the run was trained on.
        A request for one user at one time (many candidates) takes the one-user serving path."""

        def load_context(self, context):
            import os

            import torch

            from twinv2.training.scoring import RunScorer

            # one request at a time per server worker: one intra-op thread each (scale out with workers);
            # TWINV2_SERVE_THREADS overrides (on the 2-core VM, 2 OpenMP threads ran one request ~10x slower)
            torch.set_num_threads(max(1, int(os.environ.get("TWINV2_SERVE_THREADS", "1"))))
            self.scorer = RunScorer(context.artifacts["run_dir"])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            return pd.DataFrame({"score": self.scorer.score_frame(model_input)})

    return TwinV2Model


def log_pyfunc(mlflow, out: Path, world):
    """Log the run as an MLflow pyfunc model with a signature (user_id, item_id, ts) -> score, into the active
    run; returns its ModelInfo (model_id: what register links the registered version to)."""
    import shutil
    import tempfile

    import pandas as pd
    from mlflow.models import infer_signature

    from twinv2.training.scoring import RunScorer

    imp = world.impressions
    if world.sample_floor is not None:                # rows the model may score without leakage
        imp = imp[imp["ts"] >= world.sample_floor]
    example = imp[["user_id", "item_id", "ts"]].head(5).reset_index(drop=True)
    scores = RunScorer(out, world=world).predict_frame(example)["prob"]
    signature = infer_signature(example, pd.DataFrame({"score": scores}))
    with tempfile.TemporaryDirectory() as tmp:      # the weights, not the checkpoints
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        for f in ("config.json", "vocab.npz", "model.pt", "item_embeddings.npz"):
            if (out / f).exists():
                shutil.copy2(out / f, run_dir / f)
        info = mlflow.pyfunc.log_model(name="model", python_model=pyfunc_class()(),
                                       artifacts={"run_dir": str(run_dir)}, signature=signature,
                                       input_example=example)
    mlflow.set_tag("logged_model_id", info.model_id)   # register links its version to this logged model
    return info
