"""Artifacts out, and the runtime that reads them. Imports nothing from `compress` or `calibration`.

Writing: check_out and check_source before any work, then write(...) once. Reading: load, verify."""

from export.format import DTYPES
from export.loader import load, verify
from export.records import BlockWidths, QuantRecord
from export.target import TargetError
from export.write import ExportSettings, Provenance, UnwritableError, check_out, check_source, weights_bytes, write
from export.writer import ArtifactExistsError, sha256_file

__all__ = ["DTYPES", "ArtifactExistsError", "BlockWidths", "ExportSettings", "Provenance", "QuantRecord",
           "TargetError", "UnwritableError", "check_out", "check_source", "load", "sha256_file", "verify",
           "weights_bytes", "write"]
