"""Samples, training loop, checkpoints and DDP."""
