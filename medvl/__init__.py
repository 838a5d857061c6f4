"""medvl: build, train, distill, evaluate and serve medical vision-language models.

The top-level package stays light: importing :mod:`medvl` pulls in neither torch nor
transformers. Sub-packages import their heavy dependencies when they are used.
"""

__version__ = "0.1.0"

from medvl.errors import MedvlUserError  # noqa: E402



def load(path):
    """A trained VLM folder -> a pipeline with ``.answer(image, question)`` and ``.predict(...)``."""
    from medvl.generate.pipeline import load as _load
    return _load(path)


__all__ = ["MedvlUserError", "__version__", "load"]
