"""Data-layer throughput against plain library loops doing the same work, same run.

    python benchmarks/bench_data.py [--data ../shared/data] [--repeat 3] [--out benchmarks/results/data.json]

1. Conversion (records/s): VQA-RAD's published JSON (x10, 30,640 records) read with the
   ``vqa-rad`` reader and written as canonical JSONL, against a plain ``json`` loop that
   builds the same dicts and writes the same lines; and LLaVA JSON -> ShareGPT against a
   plain loop.
2. Decode + preprocess (images/s) to a normalised ``[3, 224, 224]`` float array (pad to
   square): JPEG and PNG (VQA-RAD originals), DICOM (the pydicom / pydicom-data files,
   HU + the file's window), against PIL / pydicom loops; NIfTI volumes to ``[1, 32, 128,
   128]`` against a nibabel + torch loop.

Each measurement is the best of ``--repeat`` runs (the machine is shared). Ratios are
medvl time / plain time (lower is better; 1.0 = same speed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from medvl.data.formats import get_format
from medvl.data.imageio import load_medical
from medvl.data.schema import write_jsonl
from medvl.data.transforms import CLIP_MEAN, CLIP_STD, preprocess_2d, preprocess_3d

MEAN = np.array(CLIP_MEAN, np.float32)[:, None, None]
STD = np.array(CLIP_STD, np.float32)[:, None, None]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---- plain references -----------------------------------------------------------------

def plain_vqa_rad_to_jsonl(src: Path, out: Path) -> int:
    rows = json.loads(src.read_text())
    with open(out, "w", encoding="utf-8") as f:
        for r in rows:
            d = {"id": str(r["qid"]), "images": [{"path": r["image_name"], "kind": "image"}],
                 "conversation": [{"role": "user", "text": "<image>\n" + str(r["question"]).strip()},
                                  {"role": "assistant", "text": str(r["answer"])}],
                 "labels": {"answer_type": str(r["answer_type"]).strip().upper(),
                            "question_type": r["question_type"], "organ": r["image_organ"]},
                 "meta": {"qid": r["qid"], "phrase_type": r["phrase_type"]}}
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return len(rows)


def plain_llava_to_sharegpt(src: Path, out: Path) -> int:
    rows = json.loads(src.read_text())
    names = {"human": "user", "gpt": "assistant"}
    res = [{"messages": [{"role": names[c["from"]], "content": c["value"]} for c in r["conversations"]],
            "images": [r["image"]]} for r in rows]
    out.write_text(json.dumps(res, ensure_ascii=False, indent=1))
    return len(res)


def _pad_resize_normalise(im) -> np.ndarray:
    """PIL: longest side to 224, pad to a square, [3, 224, 224] normalised."""
    from PIL import Image
    s = 224 / max(im.size)
    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    canvas = Image.new("RGB", (224, 224))
    canvas.paste(im, ((224 - im.width) // 2, (224 - im.height) // 2))
    x = np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


def plain_pil(path: Path) -> np.ndarray:
    from PIL import Image
    return _pad_resize_normalise(Image.open(path).convert("RGB"))


def plain_dicom(path: Path) -> np.ndarray:
    import pydicom
    from PIL import Image
    ds = pydicom.dcmread(path)
    a = ds.pixel_array.astype(np.float32)
    if ds.get("SamplesPerPixel", 1) == 1:
        a = a * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
        if wc is not None:
            wc = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
            ww = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
            a = np.clip((a - (wc - 0.5)) / (ww - 1) + 0.5, 0, 1)
        else:
            a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            a = 1 - a
        im = Image.fromarray((a * 255).astype(np.uint8)).convert("RGB")
    else:
        im = Image.fromarray(a.astype(np.uint8))
    return _pad_resize_normalise(im)


def plain_nifti(path: Path) -> np.ndarray:
    import nibabel as nib
    import torch
    import torch.nn.functional as F
    img = nib.load(str(path))
    if len(img.shape) == 4:
        img = img.slicer[..., 0]
    d = nib.as_closest_canonical(img).get_fdata(dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
    t = F.interpolate(torch.from_numpy(d.copy())[None, None], size=(32, 128, 128), mode="trilinear",
                      align_corners=False)[0]
    return ((t - t.min()) / (t.max() - t.min())).numpy()


# ---- medvl -----------------------------------------------------------------------------

def ours_2d(path: Path) -> np.ndarray:
    return preprocess_2d(load_medical(path), 224, mode="pad")


def ours_3d(path: Path) -> np.ndarray:
    return preprocess_3d(load_medical(path, frame=0 if "4d" in path.name else None), (32, 128, 128))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images", type=int, default=60, help="JPEG/PNG images per run")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data.json"))
    args = ap.parse_args()
    data = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-"))
    results: dict[str, dict] = {}
    try:
        # -- conversion
        rows = json.loads((data / "vqa_rad" / "trainset.json").read_text()) * 10
        for k, r in enumerate(rows):
            r = dict(r)
            r["qid"] = k
            rows[k] = r
        big = tmp / "vqa_rad_x10.json"
        big.write_text(json.dumps(rows))
        fmt = get_format("vqa-rad")
        n = len(rows)
        t_ours = best(lambda: write_jsonl(fmt.read(big).samples, tmp / "o.jsonl"), args.repeat)
        t_plain = best(lambda: plain_vqa_rad_to_jsonl(big, tmp / "p.jsonl"), args.repeat)
        results["convert vqa-rad -> medvl jsonl"] = dict(n=n, unit="records", ours_s=t_ours, plain_s=t_plain)

        samples = fmt.read(big).samples
        get_format("llava").write(samples, tmp / "llava.json")
        llava, share = get_format("llava"), get_format("sharegpt")
        t_ours = best(lambda: share.write(llava.read(tmp / "llava.json").samples, tmp / "o" / "s.json"), args.repeat)
        t_plain = best(lambda: plain_llava_to_sharegpt(tmp / "llava.json", tmp / "p_s.json"), args.repeat)
        results["convert llava -> sharegpt"] = dict(n=n, unit="records", ours_s=t_ours, plain_s=t_plain)

        # -- images
        jpgs = sorted((data / "vqa_rad" / "images").glob("*.jpg"))[: args.images]
        from PIL import Image
        pngs = []
        for p in jpgs:
            q = tmp / (p.stem + ".png")
            Image.open(p).save(q)
            pngs.append(q)
        dicoms = sorted((data / "medical_formats").rglob("*.dcm"))
        niftis = [data / "medical_formats" / "nibabel" / "anatomical.nii",
                  data / "medical_formats" / "nibabel" / "example4d.nii.gz"]
        for name, files, ours, plain, reps in (
                ("JPEG -> [3,224,224]", jpgs, ours_2d, plain_pil, 1),
                ("PNG -> [3,224,224]", pngs, ours_2d, plain_pil, 1),
                ("DICOM -> [3,224,224]", dicoms, ours_2d, plain_dicom, 5),
                ("NIfTI -> [1,32,128,128]", niftis, ours_3d, plain_nifti, 10)):
            batch = files * reps
            t_ours = best(lambda: [ours(f) for f in batch], args.repeat)
            t_plain = best(lambda: [plain(f) for f in batch], args.repeat)
            results[name] = dict(n=len(batch), unit="images", ours_s=t_ours, plain_s=t_plain)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; best of {args.repeat}\n")
    print("| task | n | medvl /s | plain /s | time ratio medvl/plain |")
    print("|---|---|---|---|---|")
    for k, r in results.items():
        r["ours_per_s"] = r["n"] / r["ours_s"]
        r["plain_per_s"] = r["n"] / r["plain_s"]
        r["ratio"] = r["ours_s"] / r["plain_s"]
        print(f"| {k} | {r['n']:,} {r['unit']} | {r['ours_per_s']:,.0f} | {r['plain_per_s']:,.0f} | {r['ratio']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
