"""DDP on CPU with the gloo backend and 2 processes.

Exactness: one DDP step where each rank holds half of a batch equals one single-process step on the
whole batch (DDP averages gradients; each half's loss is a mean over equally many samples)."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from twinv2.models import build_model

VOCAB = {"item": 40, "author": 8, "category": 6, "dur_bucket": 5, "cross": [6, 7, 9]}
SMALL = {"embed_dim": 8, "side_dim": 4, "cross_dim": 4, "n_heads": 2, "head_dim": 4, "topk": 5, "short_len": 6,
         "twin_window": 12, "twin_full_len": 12, "din_len": 12, "din_att_mlp": [8], "mlp": [16], "sim_soft_dim": 4,
         "eta_bits": 16, "sdim_hashes": 3, "sdim_width": 2, "hash_seed": 0}


def _batch(B=8, L=12, S=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def seq(n):
        lens = torch.randint(1, n + 1, (B,), generator=g)
        mask = torch.arange(n)[None] < lens[:, None]
        out = {k: torch.randint(1, VOCAB[k], (B, n), generator=g) * mask for k in ("item", "author", "category",
                                                                                   "dur_bucket")}
        out["cross"] = torch.stack([torch.randint(1, c, (B, n), generator=g) for c in VOCAB["cross"]], -1) * mask[..., None]
        out["mask"] = mask
        out["log_n"] = torch.zeros(B, n)
        return out

    target = {k: torch.randint(1, VOCAB[k], (B,), generator=g) for k in ("item", "author", "category", "dur_bucket")}
    return {"target": target, "long": seq(L), "short": seq(S), "label": torch.randint(0, 2, (B,), generator=g).float(),
            "user": torch.arange(B)}


def _half(batch, r, world):
    if isinstance(batch, dict):
        return {k: _half(v, r, world) for k, v in batch.items()}
    n = batch.shape[0] // world
    return batch[r * n:(r + 1) * n]


def _step(model, batch):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
    opt.zero_grad()
    loss.backward()
    opt.step()


def _worker(rank, world, port, path):
    from twinv2.training import ddp

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = ddp.setup("cpu")
    blob = torch.load(path / "init.pt", weights_only=False)
    model = build_model(blob["name"], VOCAB, SMALL)
    model.load_state_dict(blob["state"])
    net = ddp.wrap(model, info)
    _step(net, _half(blob["batch"], rank, world))
    torch.save(ddp.unwrap(net).state_dict(), path / f"rank{rank}.pt")
    ddp.cleanup(info)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["twinv2", "sim_soft"])
def test_ddp_step_equals_single_process_full_batch(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, VOCAB, SMALL)
    batch = _batch()
    torch.save({"name": name, "state": model.state_dict(), "batch": batch}, tmp_path / "init.pt")
    mp.start_processes(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True, start_method="spawn")
    _step(model, batch)
    ref = model.state_dict()
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    changed = 0
    for k in ref:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)          # ranks stay in lockstep
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6)   # = the full-batch step
        changed += int(not torch.equal(ref[k], torch.load(tmp_path / "init.pt", weights_only=False)["state"][k]))
    assert changed > 0


def test_torchrun_two_processes_trains(planted_ro, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "pipelines.cli",
           "--set", "train.epochs=2", "--set", "train.progress=false", "--set", "train.batch_size=128",
           "--set", "model.twin_window=48", "--set", "model.topk=16",
           "train", "--data", str(planted_ro), "--model", "twin", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    rep = json.loads((out / "train_metrics.json").read_text())
    assert rep["world_size"] == 2 and rep["epochs_run"] == 2
    assert torch.load(out / "model.pt", weights_only=True)
    assert rep["best_valid_gauc"] > 0.55
