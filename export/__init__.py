"""Artifacts out, and the runtime that reads them. Imports nothing from `compress` or `calibration`."""

from export.loader import load, verify

__all__ = ["load", "verify"]
