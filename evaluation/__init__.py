"""Evaluation: bundles against their PyTorch checkpoint (parity) and speed, memory and size (bench)."""
