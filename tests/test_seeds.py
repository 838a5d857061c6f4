"""Each seed's workflow end to end on files in that seed's own layout, run from a working directory
other than the data's, with the commands docs/seeds.md gives (small fixtures made here, stand-in
images at the seeds' paths)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvl.cli import main

RECIPES = Path(__file__).parents[1] / "recipes"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    o = capsys.readouterr()
    return code, o.out, o.err


def _image(path: Path, shade: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(shade).integers(0, 255, (48, 48), dtype=np.uint8)).save(path)


# ---- MMKD-CLIP -----------------------------------------------------------------------------------
TEACHERS = {"BMCA": (512, 768), "BiomedCLIP": (512, 512), "UniMedCLIP": (512, 512)}  # projected, raw widths


def mmkd_tree(root: Path, n: int = 12) -> Path:
    """MMKD-CLIP's layout: meta.jsonl rows (folderid, id, imgpath, metapath, txt, available_clips) and
    features/<folderid>/<id>/clips_output.pt + clips_project_output.pt, torch.save'd dicts of 1-D tensors."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        folder, sid = f"{i // 5:03d}", f"{i:05d}"
        clips = sorted(TEACHERS) if i % 3 else ["BMCA", "BiomedCLIP"]
        _image(root / "images" / folder / f"{sid}.jpg", i)
        d = root / "features" / folder / sid
        d.mkdir(parents=True)
        for fname, which in (("clips_project_output.pt", 0), ("clips_output.pt", 1)):
            torch.save({f"{t}_{m}": torch.randn(TEACHERS[t][which], generator=g) for t in clips
                        for m in ("img", "txt")}, d / fname)
        rows.append({"folderid": folder, "id": sid, "imgpath": f"images/{folder}/{sid}.jpg",
                     "metapath": f"meta/{folder}/{sid}.json", "txt": f"axial ct of the abdomen, case {i}",
                     "available_clips": clips})
    (root / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "meta.jsonl"


def test_mmkd_clip_real_layout_validates_and_trains_from_another_directory(tmp_path, monkeypatch, capsys):
    meta = mmkd_tree(tmp_path / "mmkd")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    from medvl.data.formats import get_format
    conv = get_format("mmkd-clip").read(meta)
    s = conv.samples[1]
    assert s.teacher_features["BMCA_img"] == "features/000/00001/clips_project_output.pt#BMCA_img"
    raw = get_format("mmkd-clip").read(meta, features="raw").samples[1]
    from medvl.data.formats.mmkd import load_teacher_feature
    assert load_teacher_feature(raw.teacher_features["BMCA_img"], meta.parent).shape == (768,)
    code, out, err = run(capsys, "data", "validate", meta, "--format", "mmkd-clip")
    assert code == 0, out + err
    code, out, err = run(capsys, "train", RECIPES / "mmkd-stage2.yaml", f"data.path={meta}", "model=test-tiny",
                         "max_steps=2", "batch_size=4", "warmup_steps=1", "precision=fp32", "output_dir=run", "log_every=1")
    assert code == 0, out + err
    assert (work / "run" / "model").exists()
    log = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all({"clip", "mse", "cross"} <= set(r) for r in log)  # the teachers were used
    assert "12 image-text pairs; left out: nothing" in out + err


def test_mmkd_validate_reports_missing_teacher_features(tmp_path, monkeypatch, capsys):
    meta = mmkd_tree(tmp_path / "mmkd", n=4)
    import shutil
    shutil.rmtree(tmp_path / "mmkd" / "features" / "000" / "00002")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "data", "validate", meta, "--format", "mmkd-clip")
    assert code == 2 and "no teacher feature file was found" in out + err and "00002" in out + err
