"""Hierarchical clustering of life-cycle histories (TWIN-V2's offline half); see docs/clustering.md.

grouping (completion-ratio groups) -> hierarchical + kmeans (fast level-batched recursive k-means;
reference.py is the plain per-node version) -> virtual_items; chunk (one chunk of users end to end),
incremental (W_old -> W_new updates), embeddings (trained or bootstrap), store (versions, CURRENT)."""
