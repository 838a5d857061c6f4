"""Rebuild medvl's bundled VQA-RAD from the original files.

    python scripts/build_bundled_vqa_rad.py [--src ../shared/data/vqa_rad] [--size 256] [--quality 85]

Reads ``trainset.json`` / ``testset.json`` with medvl's ``vqa-rad`` reader (so the bundled
copy gets exactly the reader's normalisations, listed in its docstring), downsamples each
image so its longest side is ``--size`` pixels (Lanczos, grayscale kept grayscale), saves
it as JPEG, and writes ``medvl/bundled/vqa-rad/{train,test}.jsonl`` with paths relative
to that folder. Deterministic: the same sources give the same files.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

from medvl.data.formats import get_format
from medvl.data.schema import write_jsonl

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "medvl" / "bundled" / "vqa-rad"

LICENSE = """\
VQA-RAD — bundled copy in medvl

Source: Lau, J. J., Gayen, S., Ben Abacha, A. & Demner-Fushman, D. "A dataset of clinically
generated visual questions and answers about radiology images." Scientific Data 5, 180251
(2018). https://doi.org/10.1038/sdata.2018.251 — dataset at https://osf.io/89kps/
Files taken from the MEVF layout (github.com/Awenbocc/med-vqa, folder data/).

Licence: CC0 1.0 Universal (public domain dedication), as stated on the dataset card.
Images come from MedPix (National Library of Medicine).

Changes made by medvl (scripts/build_bundled_vqa_rad.py):
- images downsampled to at most {size} px on the longest side, JPEG quality {quality};
- integer answers (e.g. 4) written as strings ("4");
- answer_type stripped and upper-cased ("CLOSED " -> "CLOSED");
- question_type upper-cased, typos fixed (Other -> OTHER, ATRIB -> ATTRIB, PRSE -> PRES);
  the original values are kept per record in meta.original.
The split is by question, as published: every test image also appears in training.
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "vqa_rad"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quality", type=int, default=85)
    args = ap.parse_args()
    src = Path(args.src)
    if not (src / "trainset.json").exists():
        print(f"error: {src}/trainset.json not found", file=sys.stderr)
        return 2
    if DEST.exists():
        shutil.rmtree(DEST)
    (DEST / "images").mkdir(parents=True)
    fmt = get_format("vqa-rad")
    done: set[str] = set()
    for split, fname in (("train", "trainset.json"), ("test", "testset.json")):
        conv = fmt.read(src / fname, image_dir="images")
        if conv.skipped:
            print(f"error: {len(conv.skipped)} records skipped in {fname}", file=sys.stderr)
            return 2
        for s in conv.samples:
            rel = s.images[0].path
            if rel not in done:
                im = Image.open(src / rel)
                im = im.convert("L") if im.mode in ("L", "LA", "I;16", "I") else im.convert("RGB")
                im.thumbnail((args.size, args.size), Image.LANCZOS)
                im.save(DEST / rel, "JPEG", quality=args.quality, optimize=True)
                done.add(rel)
            s.meta["source"] = "vqa-rad"
        n = write_jsonl(conv.samples, DEST / f"{split}.jsonl")
        print(f"{split}: {n} samples; notes: {'; '.join(conv.notes) or 'none'}")
    (DEST / "LICENSE.txt").write_text(LICENSE.format(size=args.size, quality=args.quality), encoding="utf-8")
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"{len(done)} images; bundle size {size / 1e6:.2f} MB in {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
