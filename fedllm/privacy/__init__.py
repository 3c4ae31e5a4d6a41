"""Differential privacy: client-level DP-FedAvg (fixed and adaptive clipping), its accountant, DP-SGD."""
