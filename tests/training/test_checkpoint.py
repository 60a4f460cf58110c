"""Checkpoint files: a good one round-trips; a damaged or foreign one is a ValueError that names the file."""
import pytest
import torch

from twinv2.training.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint


def test_checkpoint_round_trip_and_pruning(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch, {"epoch": epoch, "w": torch.arange(4.0) * epoch})
    assert latest_checkpoint(tmp_path).name == "epoch-0003.pt"
    assert [p.name for p in prune_checkpoints(tmp_path, 2)] == ["epoch-0001.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4.0) * 3)
    assert not list(tmp_path.glob("*.tmp*"))      # atomic writes leave no temporaries behind


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_checkpoint_names_the_file(tmp_path, damage):
    good = save_checkpoint(tmp_path, 1, {"epoch": 1, "w": torch.ones(1000)})
    data = good.read_bytes()
    bad = tmp_path / "epoch-0002.pt"
    bad.write_bytes({"garbage": b"not a torch file at all", "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"epoch-0002\.pt: cannot read the checkpoint"):
        load_checkpoint(bad)
