"""Teachers for logit distillation: a live frozen VLM, or its top-k logits cached on disk.

Both hand the trainer the teacher's logits at the student batch's answer positions, in the
student's row order (sample by sample, positions ascending), so the loss can pair rows
one to one. Teacher and student must share the tokenizer — the student is built with the
teacher's — but not the architecture: each model encodes the same sample with its own
number of image tokens, and the answer tokens (identical ids) line up.

* :class:`LiveTeacher` — any composed VLM medvl loads (it may be larger, and on another
  device: its logits come back to the student's). Frozen, eval mode, no gradient; its
  vision tokens are computed once per distinct image.
* :class:`NativeTeacher` — a native Hugging Face VLM (Qwen2-VL-7B teaching Qwen2-VL-2B, as in
  ClinKD), encoding with its own processor.
* :class:`CachedTeacher` — a folder written by :func:`cache_teacher` (``medvl distill
  cache-teacher``): per answer token the k largest teacher logits (fp16) and their ids
  (int32), with the teacher's tokenizer. k = 32 over a 150k vocabulary stores 192 bytes per
  answer token instead of 600 kB; the loss is then computed on the top-k support (see
  :mod:`medvl.losses.logit_kd`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from medvl.data.schema import Media
from medvl.data.textfile import atomic_write_text
from medvl.errors import MedvlUserError
from medvl.losses.logit_kd import LogitKDLoss, TopK, topk_missing_mass, topk_of
from medvl.models.answer import answer_logits
from medvl.models.hub import load_model_tokenizer, resolve_model_path
from medvl.models.precision import resolve_precision


class LiveTeacher:
    def __init__(self, path: str | Path, tokenizer, max_length: int, device: str = "cpu", topk: int = 0,
                 precision: str = "auto"):
        from medvl.data.collate import VLMCollator
        from medvl.models.vlm import load_vlm

        self.model = load_vlm(resolve_model_path(path)).to(device).eval()
        self.tokenizer = tokenizer
        for p in self.model.parameters():
            p.requires_grad = False
        self.device = device
        self.topk = topk
        self.precision = resolve_precision(precision, device)  # auto: bf16 only where computed natively
        self.collator = VLMCollator(tokenizer, tokens_per_image=self.model.tokens_per_image, max_length=max_length)
        self.encoded: dict = {}
        self.vision_cache: dict = {}
        self.missing_mass: list[float] = []

    def prepare(self, samples: Sequence) -> set[str]:
        """Encode the samples with the teacher's image-token count and cache its vision tokens;
        returns the ids the teacher could not encode (too long for it)."""
        from medvl.models.vlm import image_loader_for
        load = image_loader_for(self.model)
        lost = set()
        for s in samples:
            e = self.collator.encode(s)
            if e is None:
                lost.add(s.id)
                continue
            self.encoded[s.id] = e
            for m in e.images:
                if m.path not in self.vision_cache:
                    with torch.no_grad():
                        self.vision_cache[m.path] = self.model.vision(load(Media(m.path))[None].to(self.device))[0]
        return lost

    def n_answer_tokens(self, sid: str) -> int:
        return sum(1 for y in self.encoded[sid].labels[1:] if y != -100)

    @torch.no_grad()
    def rows(self, ids: Sequence[str]) -> torch.Tensor | TopK:
        """Teacher logits at the answer positions of these samples, in order: [N, V] (or TopK)."""
        m = self.model
        batch = [self.encoded[i] for i in ids]
        enc = {k: v.to(self.device) for k, v in self.collator(batch).items()}
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            imgs = [im for e in batch for im in e.images]
            vt = torch.stack([self.vision_cache[im.path] for im in imgs]) if imgs else None
            emb = m.embed(enc["input_ids"], None, vt)
            kw = {"attention_mask": enc["attention_mask"]}
            pos = m.position_ids(enc["input_ids"], enc["attention_mask"])
            if pos is not None:
                kw["position_ids"] = pos
            logits, _ = answer_logits(m.llm, emb, enc["labels"], **kw)  # [N, V]
        logits = logits.float().cpu()
        if self.topk:
            self.missing_mass.append(float(topk_missing_mass(logits, self.topk)))
            return topk_of(logits, self.topk)
        return logits


class NativeTeacher:
    """A native Hugging Face VLM as a live teacher (e.g. Qwen2-VL-7B for a Qwen2-VL-2B student):
    frozen, eval mode; it encodes each sample with its own processor (its own image-token
    count), and hands back its logits at the answer positions
    (:func:`medvl.models.native.answer_logits`)."""

    def __init__(self, path: str | Path, max_length: int, device: str = "cpu", topk: int = 0,
                 precision: str = "auto"):
        from medvl.models.native import NativeVLM
        self.vlm = NativeVLM.from_pretrained(path, max_length=max_length)
        self.vlm.model.to(device).eval()
        for p in self.vlm.model.parameters():
            p.requires_grad = False
        self.tokenizer = self.vlm.tok
        self.device, self.topk, self.precision = device, topk, resolve_precision(precision, device)
        self.encoded: dict = {}
        self.missing_mass: list[float] = []

    def prepare(self, samples: Sequence) -> set[str]:
        lost = set()
        for s in samples:
            e = self.vlm.encode(s)
            if e is None:
                lost.add(s.id)
            else:
                self.encoded[s.id] = e
        return lost

    def n_answer_tokens(self, sid: str) -> int:
        from medvl.models.native import answer_token_count
        return answer_token_count(self.encoded[sid])

    @torch.no_grad()
    def rows(self, ids: Sequence[str]) -> torch.Tensor | TopK:
        from medvl.models.native import answer_logits
        batch = {k: v.to(self.device) for k, v in self.vlm.collate([self.encoded[i] for i in ids]).items()}
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits, _ = answer_logits(self.vlm.model, batch)  # [N, V]
        logits = logits.float().cpu()
        if self.topk:
            self.missing_mass.append(float(topk_missing_mass(logits, self.topk)))
            return topk_of(logits, self.topk)
        return logits


def is_native_folder(path: str | Path) -> bool:
    """A Hugging Face VLM folder (anything whose config is not a composed medvl VLM's)."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return True  # a hub id: native models are the ones that come from the hub
    return json.loads(cfg.read_text()).get("model_type") != "medvl_vlm"


def live_teacher(path: str | Path, max_length: int, device: str = "cpu", topk: int = 0, precision: str = "auto"):
    """The live teacher for a composed VLM folder or shipped name, or a native folder or hub id."""
    try:
        folder = resolve_model_path(path)
    except MedvlUserError:
        folder = None  # not a local folder: a hub id, loaded as a native model
    if folder is not None and not is_native_folder(folder):
        return LiveTeacher(folder, load_model_tokenizer(folder), max_length, device=device, topk=topk,
                           precision=precision)
    return NativeTeacher(folder or path, max_length, device=device, topk=topk, precision=precision)


class CachedTeacher:
    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file
        folder = Path(folder)
        if not (folder / "teacher_topk.safetensors").exists():
            raise MedvlUserError("not a teacher cache (expected teacher_topk.safetensors, index.json, tokenizer/); "
                                 "write one with `medvl distill cache-teacher`", path=folder)
        t = load_file(str(folder / "teacher_topk.safetensors"))
        self.values, self.indices, offsets = t["values"], t["indices"], t["offsets"].tolist()
        self.index = json.loads((folder / "index.json").read_text())
        self.span = {sid: (offsets[k], offsets[k + 1]) for k, sid in enumerate(self.index["ids"])}
        self.tokenizer = load_model_tokenizer(folder)

    def prepare(self, samples: Sequence) -> set[str]:
        return {s.id for s in samples if s.id not in self.span}

    def rows(self, ids: Sequence[str]) -> TopK:
        sl = [self.span[i] for i in ids]
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):  # fp16 rows: no autocast
            return TopK(torch.cat([self.values[a:b] for a, b in sl]), torch.cat([self.indices[a:b] for a, b in sl]))


def cache_teacher(teacher: str | Path, samples: Sequence, out: str | Path, topk: int = 32, max_length: int = 128,
                  batch_size: int = 32, progress: bool = True, part_size: int = 512) -> dict:
    """Run the teacher over the samples once and store its top-k answer-position logits.

    Resumable: every ``part_size`` samples the rows go to ``OUT/parts/part-NNNNN.safetensors`` (written
    whole, then renamed), with the ids they hold in a sidecar JSON; a rerun of the same command after
    a kill keeps every finished part and computes only the rest. At the end the parts are merged, in
    the samples' order, into ``teacher_topk.safetensors`` + ``index.json`` (each written atomically)
    and removed. Parts made with another teacher or k are refused, not mixed in."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    out = Path(out)
    parts_dir = out / "parts"
    live = live_teacher(teacher, max_length, topk=topk)
    tok = live.tokenizer
    lost = live.prepare(samples)
    ids = [s.id for s in samples if s.id not in lost]
    if len(set(ids)) != len(ids):
        raise MedvlUserError("sample ids repeat: the cache is keyed by id")
    done: dict[str, int] = {}  # id -> its part
    meta: dict[int, dict] = {}
    for side in sorted(parts_dir.glob("part-*.json")) if parts_dir.is_dir() else []:
        info = json.loads(side.read_text())
        if (info["teacher"], info["k"]) != (str(teacher), topk):
            raise MedvlUserError(f"{parts_dir} holds parts of another run (teacher {info['teacher']}, k {info['k']}); "
                                 "remove it or write elsewhere", path=parts_dir)
        if side.with_suffix(".safetensors").is_file():
            k = int(side.stem.split("-")[1])
            meta[k] = info
            done.update({i: k for i in info["ids"]})
    todo = [i for i in ids if i not in done]
    if done and progress:
        print(f"resuming: {len(done):,} samples already cached in {parts_dir}")
    parts_dir.mkdir(parents=True, exist_ok=True)
    next_part = max(meta, default=-1) + 1
    bar = tqdm(total=len(todo), desc="teacher top-k", unit="sample", disable=not progress)
    for p0 in range(0, len(todo), part_size):
        part_ids = todo[p0:p0 + part_size]
        values, indices, counts = [], [], []
        missing_before = len(live.missing_mass)
        for b in range(0, len(part_ids), batch_size):
            chunk = part_ids[b:b + batch_size]
            rows = live.rows(chunk)
            values.append(rows.values)
            indices.append(rows.indices)
            counts += [live.n_answer_tokens(i) for i in chunk]  # rows per sample = answer tokens after the shift
            bar.update(len(chunk))
        path = parts_dir / f"part-{next_part:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({"values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous()}, str(tmp))
        tmp.replace(path)
        mm = live.missing_mass[missing_before:]
        info = {"teacher": str(teacher), "k": topk, "ids": part_ids, "counts": counts,
                "missing_mass_sum": sum(mm), "missing_mass_n": len(mm)}
        atomic_write_text(path.with_suffix(".json"), json.dumps(info))
        meta[next_part] = info
        done.update({i: next_part for i in part_ids})
        next_part += 1
    bar.close()
    # merge in the samples' order
    tensors = {k: load_file(str(parts_dir / f"part-{k:05d}.safetensors")) for k in sorted(set(done.values()))}
    span: dict[str, tuple[int, int, int]] = {}
    for k, info in meta.items():
        start = 0
        for i, c in zip(info["ids"], info["counts"]):
            span[i] = (k, start, start + c)
            start += c
    values, indices, offsets = [], [], [0]
    for i in ids:
        k, a, b = span[i]
        values.append(tensors[k]["values"][a:b])
        indices.append(tensors[k]["indices"][a:b])
        offsets.append(offsets[-1] + b - a)
    final = out / "teacher_topk.safetensors"
    tmp = final.with_name(final.name + ".tmp")
    save_file({"values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous(),
               "offsets": torch.tensor(offsets)}, str(tmp))
    tmp.replace(final)
    n_mm = sum(m["missing_mass_n"] for m in meta.values())
    info = {"ids": ids, "k": topk, "teacher": str(teacher), "answer_tokens": offsets[-1],
            "skipped_too_long": sorted(lost),
            "mean_missing_mass": sum(m["missing_mass_sum"] for m in meta.values()) / max(1, n_mm)}
    tok.save_pretrained(str(out / "tokenizer"))
    atomic_write_text(out / "index.json", json.dumps(info))  # last: its presence says the cache is whole
    for f in parts_dir.glob("part-*"):
        f.unlink()
    parts_dir.rmdir()
    return {k: v for k, v in info.items() if k != "ids"} | {"samples": len(ids)}


DISTILL_KEYS = {"teacher", "teacher_cache", "alpha", "kind", "temperature", "t2_scale", "beta", "vocab", "topk",
                "device"}


def make_teacher(distill: dict, max_length: int, precision: str = "auto"):
    """The live or cached teacher and the KD loss a recipe's ``distill`` section asks for."""

    d = dict(distill)
    unknown = sorted(set(d) - DISTILL_KEYS)
    if unknown:
        raise MedvlUserError(f"distill: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(DISTILL_KEYS))}")
    if bool(d.get("teacher")) == bool(d.get("teacher_cache")):
        raise MedvlUserError("distill needs exactly one of teacher (a VLM folder) or teacher_cache (a cache folder)")
    kd = LogitKDLoss(alpha=float(d.get("alpha", 0.5)), kind=d.get("kind", "forward"),
                     temperature=float(d.get("temperature", 1.0)), t2_scale=bool(d.get("t2_scale", False)),
                     beta=float(d.get("beta", 0.5)), vocab=d.get("vocab", "error"))
    if d.get("teacher_cache"):
        return CachedTeacher(d["teacher_cache"]), kd
    return live_teacher(d["teacher"], max_length, device=d.get("device", "cpu"), topk=int(d.get("topk", 0)),
                        precision=precision), kd
