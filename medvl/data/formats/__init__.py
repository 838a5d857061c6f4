"""Readers and writers for the dataset formats medvl users bring, one module each.

``FORMATS`` is an exact-name registry; ``get_format(name)`` returns an instance.
``medvl data formats`` prints this table.
"""

from __future__ import annotations

from medvl.data.formats.base import Conversion, Format, Skipped
from medvl.registry import Registry

FORMATS: Registry[type[Format]] = Registry("data format")


def _register_builtin() -> None:
    from medvl.data.formats import (canonical, captions, grounding, iu_xray, llava, medmvl,
                                    mimic_cxr, mmkd, sharegpt, slake, vqa_med, vqa_rad)
    for mod in (canonical, llava, sharegpt, medmvl, grounding, vqa_rad, slake, vqa_med,
                mimic_cxr, iu_xray, captions, mmkd):
        FORMATS.register(mod.FORMAT.name, mod.FORMAT)


def get_format(name: str) -> Format:
    return FORMATS.get(name)()


_register_builtin()

__all__ = ["FORMATS", "Conversion", "Format", "Skipped", "get_format"]
