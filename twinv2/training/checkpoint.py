"""Checkpoints: one file per epoch, written atomically, loadable with torch.load(weights_only=True); only the
newest `train.keep_checkpoints` (default 2) are kept.

A checkpoint holds everything `--resume` needs to continue to the same result as an uninterrupted run:
model and optimizer state, the epoch reached, the early-stopping state (best GAUC, its epoch and
weights, epochs without improvement), the per-epoch history, and the torch RNG state.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from twinv2.artifacts import load_checkpoint, state_hash  # noqa: F401 - read below training (twinv2.artifacts)
from twinv2.io import atomic_path

_NAME = re.compile(r"^epoch-(\d{4})\.pt$")


def checkpoint_path(ckpt_dir: str | Path, epoch: int) -> Path:
    return Path(ckpt_dir) / f"epoch-{epoch:04d}.pt"


def save_checkpoint(ckpt_dir: str | Path, epoch: int, state: dict) -> Path:
    path = checkpoint_path(ckpt_dir, epoch)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _epoch_files(ckpt_dir: str | Path) -> list[Path]:
    """The epoch checkpoints in ckpt_dir, oldest first (none when the directory is missing)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)))
    return [p for _, p in found]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The checkpoint of the highest epoch in ckpt_dir, or None."""
    found = _epoch_files(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` epoch checkpoints (keep <= 0: delete none). Each checkpoint holds
    everything --resume needs (best weights included), so the newest one is enough; keeping two covers a
    disk lost mid-write of the newest. Returns the deleted paths."""
    if keep <= 0:
        return []
    old = _epoch_files(ckpt_dir)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old
