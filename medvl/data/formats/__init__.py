"""Readers and writers for the dataset formats medvl users bring, one module each.

``FORMATS`` is an exact-name registry filled by :func:`register_format` on each module's class;
every module of this package is imported here, so adding a format is adding one module.
``get_format(name)`` returns an instance; ``medvl data formats`` prints the table.
"""

from __future__ import annotations

import importlib
import pkgutil

from medvl.data.formats.base import Conversion, FORMATS, Format, Skipped, register_format

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def get_format(name: str) -> Format:
    return FORMATS.get(name)()


__all__ = ["FORMATS", "Conversion", "Format", "Skipped", "get_format", "register_format"]
