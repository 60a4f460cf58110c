"""Training end to end on the tiny world: planted signals, resume equivalence, outputs and errors."""
import json
import shutil

import numpy as np
import pytest
import torch

from pipelines import evaluate, train
from twinv2.models import MODEL_NAMES


def test_every_model_learns_the_planted_signal(planted_ro, small_params, tmp_path):
    p = small_params
    p["train"]["epochs"] = 2
    p["evaluate"].update(plots=False)
    aucs = {}
    for name in MODEL_NAMES:
        out = tmp_path / name
        rep = train.run(planted_ro, name, out, params=p)
        m = evaluate.run(planted_ro, out, params=p)
        aucs[name] = m["auc"]
        print(name, round(m["auc"], 4), f"train {rep['total_wall_s']:.1f}s eval {m['wall_s']:.1f}s")
        assert rep["epochs_run"] == 2
        _one_user_scoring_equals_per_row_scoring(out, planted_ro)
    print(aucs)
    weak = {k: v for k, v in aucs.items() if v < 0.65}
    assert not weak, f"models below AUC 0.65 on the planted signal: {weak} (all: {aucs})"


def _one_user_scoring_equals_per_row_scoring(run, data):
    """RunScorer.score_user (the user's sequences built once, broadcast over candidates: the serving path)
    gives the per-row scores of predict_frame, for users with a long history and without any."""
    import pandas as pd

    from twinv2.training.scoring import RunScorer

    s = RunScorer(run, data=data)
    items = s.world.items["item_id"].to_numpy()[::37][:40]
    lengths = s.world.user_lengths()
    for user in (int(lengths[0][np.argmax(lengths[1])]), 10**9):           # most active user; an unknown one
        ts = s.default_ts()
        fast = s.score_user(user, items, ts)
        ref = s.predict_frame(pd.DataFrame({"user_id": user, "item_id": items, "ts": ts}))["prob"]
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6, err_msg=f"{run.name} user {user}")


def test_outputs_and_metrics_contract(planted_ro, small_params, tmp_path):
    out = tmp_path / "run"
    rep = train.run(planted_ro, "twinv2", out, params=small_params)
    for f in ("config.json", "vocab.npz", "model.pt", "item_embeddings.npz", "train_metrics.json"):
        assert (out / f).exists(), f
    sd = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    z = np.load(out / "item_embeddings.npz")
    assert z["item_id"].dtype == np.int64 and z["emb"].dtype == np.float32
    assert z["emb"].shape == (len(z["item_id"]), small_params["model"]["embed_dim"]) and str(z["version"])
    kept = sorted(f.name for f in (out / "checkpoints").glob("epoch-*.pt"))   # the newest keep_checkpoints (2)
    assert kept == [f"epoch-{e:04d}.pt" for e in range(rep["epochs_run"] - 1, rep["epochs_run"] + 1)]
    # `twinv2 cluster --embeddings` reads the same table from the weights: model.pt or an epoch checkpoint
    from twinv2.clustering.embeddings import from_checkpoint, load_npz

    saved, weights = load_npz(out), from_checkpoint(out / "model.pt")
    assert weights.version == saved.version == rep["embedding_version"]
    assert np.array_equal(weights.item_id, saved.item_id) and np.array_equal(weights.emb, saved.emb)
    ck = torch.load(out / "checkpoints" / kept[-1], weights_only=True)
    epoch = from_checkpoint(out / "checkpoints" / kept[-1])
    np.testing.assert_array_equal(epoch.emb, ck["model"]["features.item.weight"][1:len(saved.item_id) + 1].numpy())
    (tmp_path / "stray.pt").write_bytes(b"")                            # weights without their run
    with pytest.raises(FileNotFoundError, match="vocab.npz"):
        from_checkpoint(tmp_path / "stray.pt")
    assert rep["cluster_version"]
    m = evaluate.run(planted_ro, out, params=small_params)
    for key in ("model", "auc", "gauc", "logloss", "oracle_auc", "oracle_gap", "by_group", "diversity"):
        assert key in m
    assert m["oracle_auc"] == 1.0 and 0.5 < m["auc"] <= 1.0
    assert sum(g["n_impressions"] for g in m["by_group"]) == m["n_test"]
    assert m["diversity"]["retrieval"]["distinct_categories"] > 0
    assert 0 < m["diversity"]["ranking"]["coverage"] <= 1
    for png in ("roc.png", "auc_by_group.png", "calibration.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    p = dict(small_params, train={**small_params["train"], "epochs": 1})
    warm = train.run(planted_ro, "twinv2", tmp_path / "warm", params=p, warm_start=out)
    assert warm["history"][0]["valid_gauc"] > rep["history"][0]["valid_gauc"] - 0.02   # starts from trained weights
    cfg = __import__("json").loads((tmp_path / "warm" / "config.json").read_text())
    assert cfg["warm_start"]["loaded"] == cfg["warm_start"]["of"]


def test_resume_reaches_the_same_result(planted_ro, small_params, tmp_path):
    p = small_params
    p["train"].update(epochs=3, keep_checkpoints=0)                    # keep every epoch: crash after epoch 1
    full = tmp_path / "full"
    rep = train.run(planted_ro, "twin", full, params=p)
    # crash after epoch 1: only its checkpoint survives
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for f in ("model.pt", "item_embeddings.npz", "train_metrics.json", "checkpoints/epoch-0002.pt",
              "checkpoints/epoch-0003.pt"):
        (crashed / f).unlink()
    rep2 = train.run(planted_ro, "twin", crashed, params=p, resume=True)
    assert rep2["resumed_from_epoch"] == 1 and rep2["epochs_run"] == 3
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(crashed / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert rep2["history"] == rep["history"][:1] + rep2["history"][1:]
    assert [h["valid_gauc"] for h in rep2["history"]] == [h["valid_gauc"] for h in rep["history"]]
    # by default only the newest checkpoints stay, and the newest alone resumes a finished run to itself
    p["train"]["keep_checkpoints"] = 1
    pruned = tmp_path / "pruned"
    train.run(planted_ro, "twin", pruned, params=p)
    assert sorted(f.name for f in (pruned / "checkpoints").iterdir()) == ["epoch-0003.pt"]
    rep3 = train.run(planted_ro, "twin", pruned, params=p, resume=True)
    assert rep3["resumed_from_epoch"] == 3
    assert [(h["train_loss"], h["valid_gauc"]) for h in rep3["history"]] == \
        [(h["train_loss"], h["valid_gauc"]) for h in rep["history"]]
    c = torch.load(pruned / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_errors_name_what_is_missing(tiny_validated_ro, small_params, tmp_path):
    with pytest.raises(ValueError, match="not a model"):
        train.run(tiny_validated_ro, "nope", tmp_path / "r", params=small_params)
    with pytest.raises(FileNotFoundError, match="cluster"):        # no cluster version yet
        train.run(tiny_validated_ro, "twinv2", tmp_path / "r", params=small_params)
    with pytest.raises(FileNotFoundError, match="validate"):
        train.run(tmp_path / "nowhere", "twin", tmp_path / "r", params=small_params)
    with pytest.raises(FileNotFoundError, match="resume"):
        train.run(tiny_validated_ro, "twin", tmp_path / "fresh", params=small_params, resume=True)


def test_twinv2_beats_twin_when_dormant_interests_matter(dormant_ro, small_params, tmp_path):
    p = small_params
    p["train"]["epochs"] = 3
    res = {}
    for name in ("twin", "twinv2"):
        train.run(dormant_ro, name, tmp_path / name, params=p)
        res[name] = evaluate.run(dormant_ro, tmp_path / name, params=p)
    print({k: (v["auc"], v["gauc"]) for k, v in res.items()})
    assert res["twinv2"]["auc"] > res["twin"]["auc"] + 0.03
    assert res["twinv2"]["gauc"] > res["twin"]["gauc"]


def test_item_table_starts_from_the_cluster_embedding_and_frozen_tables_stay(clustered_ro, small_params, tmp_path):
    """model.item_init cooc: the item rows are the cluster version's embedding (leading embed_dim components,
    one common scale); model.frozen_tables: item and author rows never move during training."""
    from twinv2.clustering.embeddings import load_npz
    from twinv2.clustering.store import current_version
    from twinv2.training.samples import Vocab

    p = small_params
    p["model"].update(item_init="cooc", frozen_tables=["item", "author"])
    p["train"]["epochs"] = 1
    out = tmp_path / "run"
    train.run(clustered_ro, "twin", out, params=p)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["warm_start"]["item_init"] == "cooc"
    vocab = Vocab.load(out / "vocab.npz")
    emb = load_npz(clustered_ro / "clusters" / current_version(clustered_ro) / "embeddings.npz")
    d = p["model"]["embed_dim"]
    want = torch.from_numpy(emb.lookup(vocab.item_ids))[:, :d]
    sd = torch.load(out / "model.pt", weights_only=True)
    got = sd["features.item.weight"][1:len(vocab.item_ids) + 1]
    scale = float((got * want).sum() / (want * want).sum())
    assert scale > 0
    torch.testing.assert_close(got, want * scale, rtol=1e-4, atol=1e-6)
    ck = torch.load(sorted((out / "checkpoints").glob("epoch-*.pt"))[-1], weights_only=False)
    torch.testing.assert_close(ck["model"]["features.author.weight"], sd["features.author.weight"])
    # a trained table moves: the category table is not frozen
    p2 = dict(p, model=dict(p["model"], frozen_tables=[]))
    train.run(clustered_ro, "twin", tmp_path / "run2", params=p2)
    sd2 = torch.load(tmp_path / "run2" / "model.pt", weights_only=True)
    assert not torch.allclose(sd2["features.item.weight"][1:len(vocab.item_ids) + 1], want * scale)
