"""Calibration data in, block-by-block statistics out."""
