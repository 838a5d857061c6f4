"""The data tour: the main job until the model issues land.

On the bundled VQA-RAD it (1) validates both splits and decodes every image, (2) converts
the training split to every format that can hold VQA and reads it back, checking that no
record is lost, (3) prints the dataset statistics, and (4) draws a contact sheet of
images with their questions and answers (``<out>/contact_sheet.png``).
"""

from __future__ import annotations

import time
from pathlib import Path

from medvl.data.bundled import load_bundled
from medvl.data.formats import get_format
from medvl.data.imageio import load_medical, to_pil
from medvl.data.schema import validate, write_jsonl
from medvl.data.stats import compute_stats, format_stats

ROUND_TRIP = ("medvl", "llava", "sharegpt", "medm-vl", "grounding", "vqa-rad", "slake",
              "vqa-med-2019", "captions")
SUFFIX = {"medvl": ".jsonl", "vqa-med-2019": ".txt", "captions": ".jsonl"}


def contact_sheet(samples, path: Path, n: int = 12, tile: int = 200) -> Path:
    from PIL import Image, ImageDraw, ImageFont

    seen, picks = set(), []
    for s in samples:
        if s.images and s.images[0].path not in seen:
            seen.add(s.images[0].path)
            picks.append(s)
        if len(picks) == n:
            break
    cols = 4
    rows = (len(picks) + cols - 1) // cols
    cap = 46
    sheet = Image.new("RGB", (cols * tile, rows * (tile + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, s in enumerate(picks):
        im = to_pil(load_medical(s.images[0].path))
        im.thumbnail((tile, tile))
        x, y = (k % cols) * tile, (k // cols) * (tile + cap)
        sheet.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        q, a = s.qa_pairs()[0]
        q = q.replace("<image>", "").strip()
        draw.text((x + 4, y + tile + 2), (q[:38] + "…") if len(q) > 38 else q, fill="black", font=font)
        draw.text((x + 4, y + tile + 16), f"A: {a[:34]}", fill="#1f5fa8", font=font)
        draw.text((x + 4, y + tile + 30), f"{s.labels.get('organ', '')} · {s.labels.get('answer_type', '')}",
                  fill="gray", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def run_tour(out: Path) -> int:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print("medvl data tour — bundled VQA-RAD (Lau et al. 2018, CC0)\n")
    splits = {sp: load_bundled("vqa-rad", sp) for sp in ("train", "test")}
    ok = True
    print("1. validate and decode")
    for sp, samples in splits.items():
        problems = validate(samples, check_files=True)
        paths = sorted({m.path for s in samples for m in s.images})
        shapes = set()
        for p in tqdm(paths, desc=f"   decoding {sp}", unit="img", leave=False, disable=None):
            shapes.add(load_medical(p).array.ndim)
        ok &= not problems
        print(f"   {sp:<5} {len(samples):>5,} samples  {len(paths):>4} images decoded  "
              f"problems: {len(problems)}")
        for p in problems[:5]:
            print(f"     {p}")

    print("\n2. convert train to each format and back (counts must match)")
    train = splits["train"]
    for name in ROUND_TRIP:
        fmt = get_format(name)
        dest = out / "formats" / f"vqa-rad-train.{name}{SUFFIX.get(name, '.json')}"
        w = fmt.write(train, dest)
        r = fmt.read(dest)
        same = w.written == len(train) and len(r.samples) == len(train) and not r.skipped
        ok &= same
        print(f"   {name:<13} wrote {w.written:>5,}  read back {len(r.samples):>5,}  "
              f"{'ok' if same else 'MISMATCH'}   {dest.name}")
    write_jsonl(train, out / "vqa-rad-train.jsonl")

    print("\n3. statistics (train)")
    print("   " + format_stats(compute_stats(train)).replace("\n", "\n   "))

    sheet = contact_sheet(splits["test"], out / "contact_sheet.png")
    print(f"\n4. contact sheet: {sheet}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s — outputs in {out}/")
    return 0 if ok else 1
