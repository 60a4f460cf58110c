"""Reading what a training run leaves (RUN/model.pt, checkpoints/epoch-NNNN.pt, vocab.npz), below both the
training floor that writes them (twinv2.training) and the clustering floor that reads a trained item table
(twinv2.clustering.embeddings.from_checkpoint): neither imports the other for it.

    load_checkpoint(path)     a weights file as a dict of tensors, torch.load(weights_only=True): no code runs
    state_hash(state_dict)    a short content hash of weights (the item-embedding version)
    vocab_item_ids(path)      the item ids of a run's vocab.npz, in table-row order (row i + 1 = item_ids[i])
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np


def load_checkpoint(path: str | Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:   # torn, foreign or not a torch file
        raise ValueError(f"{path}: cannot read the checkpoint ({e}); expected a file written by `twinv2 train`") \
            from None


def state_hash(state_dict: dict) -> str:
    """A short content hash of a state dict (for the item-embedding version)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def vocab_item_ids(path: str | Path) -> np.ndarray:
    """The `item_ids` array of a vocab.npz written by twinv2.training.samples.Vocab.save (allow_pickle=False)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z["item_ids"])
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a run's vocab.npz ({e}); expected the vocab.npz of a `twinv2 train` run") \
            from None
