"""train.compile: the training forward through torch.compile (issue 29 item 3). The run trains, its first batch is
still checked eagerly (a bad index is reported, not compiled around), its weights load into a plain model, and its
validation figures stay within compiled-kernel rounding of the eager run's (same seed, same batches)."""
import copy

import pytest

from pipelines import train


def _params(small_params, compiled: bool):
    p = copy.deepcopy(small_params)
    p["train"].update(epochs=1, compile=compiled)
    return p


def test_compiled_training_matches_eager(tmp_path, clustered_ro, small_params):
    eager = train.run(clustered_ro, "twinv2", tmp_path / "eager", _params(small_params, False))
    from torch._dynamo.utils import counters

    counters.clear()
    comp = train.run(clustered_ro, "twinv2", tmp_path / "compiled", _params(small_params, True))
    assert counters["stats"]["unique_graphs"] > 0, dict(counters["stats"])     # the forward was compiled
    (e,), (c,) = eager["history"], comp["history"]
    assert c["train_loss"] == pytest.approx(e["train_loss"], abs=2e-3)
    assert c["valid_auc"] == pytest.approx(e["valid_auc"], abs=5e-3)
    assert c["valid_gauc"] == pytest.approx(e["valid_gauc"], abs=5e-3)
    from twinv2.training.scoring import load_run_model

    model, config, _ = load_run_model(tmp_path / "compiled")      # plain state dict: no _orig_mod. prefix
    assert config["model"] == "twinv2" and not hasattr(model, "_orig_mod")
