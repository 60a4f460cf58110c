"""Offline metrics: AUC, GAUC, logloss, user groups, diversity."""
