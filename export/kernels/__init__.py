"""Compute paths for packed weights: `reference` (torch, the CPU path and the oracle GPU kernels are tested against)."""
