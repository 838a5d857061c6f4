"""The data layer: canonical samples, format readers/writers, medical image I/O,
preprocessing, and the bundled dataset.

Torch is not imported here; :mod:`medvl.data.transforms` imports it when called.
"""

from medvl.data.bundled import load_bundled
from medvl.data.imageio import MedicalImage, load_medical, to_pil, to_unit_range
from medvl.data.schema import Box, Media, Sample, Turn, read_jsonl, validate, write_jsonl

__all__ = ["Box", "Media", "MedicalImage", "Sample", "Turn", "load_bundled", "load_medical",
           "read_jsonl", "to_pil", "to_unit_range", "validate", "write_jsonl"]
