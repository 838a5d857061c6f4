"""ClinKD-style distillation end to end on tiny models: live and cached teachers, pseudo-labels,
reflective correction, SASG."""

import json
from pathlib import Path

import pytest
import torch

from medvl.data.bundled import load_bundled
from medvl.errors import MedvlUserError
from tests.test_vlm import _tiny_cfg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from medvl.train.vlm import train_vlm
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = _tiny_cfg(tmp, epochs=6, lr=3e-3, output_dir=str(tmp / "t"))
    cfg.llm = {**cfg.llm, "num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2}
    train_vlm(cfg, load_bundled("vqa-rad", "train")[:64], progress=False)
    return tmp / "t" / "model"


def _student(tmp_path, **kw):
    # another architecture and another image-token count than the teacher (pooled 2x2 instead of 16 tokens)
    return _tiny_cfg(tmp_path, connector={"name": "spatial_pooling"}, **kw)


def test_live_teacher_distillation_logs_kd_and_never_touches_the_teacher(teacher_dir, tmp_path):
    from medvl.models.vlm import load_vlm
    from medvl.train.vlm import train_vlm
    before = {k: v.clone() for k, v in load_vlm(teacher_dir).state_dict().items()}
    cfg = _student(tmp_path, distill={"teacher": str(teacher_dir), "alpha": 0.5, "temperature": 0.5})
    res = train_vlm(cfg, load_bundled("vqa-rad", "train")[:16], progress=False)
    assert all({"kd", "ce"} <= set(r) for r in res["log"]) and all(r["kd"] >= 0 for r in res["log"])
    for r in res["log"]:  # the logged loss is (alpha*KD + CE)/(1 + alpha)
        assert r["loss"] == pytest.approx((0.5 * r["kd"] + r["ce"]) / 1.5, rel=1e-3, abs=1e-3)
    assert res["model"].llm.config.vocab_size == load_vlm(teacher_dir).llm.config.vocab_size
    after = load_vlm(teacher_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res["model"].tokens_per_image != load_vlm(teacher_dir).tokens_per_image


def test_cached_topk_teacher_equals_live_topk_and_trains(teacher_dir, tmp_path):
    from medvl.distill.teacher import CachedTeacher, LiveTeacher, cache_teacher
    from medvl.models.hub import load_model_tokenizer
    from medvl.train.vlm import train_vlm
    data = load_bundled("vqa-rad", "train")[:16]
    info = cache_teacher(teacher_dir, data, tmp_path / "cache", topk=8, max_length=128, batch_size=5, progress=False)
    assert info["samples"] == 16 and 0 <= info["mean_missing_mass"] < 1
    cached = CachedTeacher(tmp_path / "cache")
    live = LiveTeacher(teacher_dir, load_model_tokenizer(teacher_dir), 128, topk=8)
    live.prepare(data)
    ids = [data[3].id, data[0].id, data[9].id]
    a, b = cached.rows(ids), live.rows(ids)
    assert torch.equal(a.indices, b.indices) or (a.values.float() - b.values.float()).abs().max() < 1e-2
    assert torch.allclose(a.values.float(), b.values.float(), atol=1e-2)
    cfg = _student(tmp_path, distill={"teacher_cache": str(tmp_path / "cache")}, output_dir=str(tmp_path / "s"))
    res = train_vlm(cfg, data, progress=False)
    assert res["steps"] == 2 and all("kd" in r for r in res["log"])


def test_cache_teacher_killed_between_parts_resumes_to_the_same_cache(teacher_dir, tmp_path, monkeypatch):
    """A run that dies after two parts (a half-written part file left beside them), then the same call:
    only the rest is computed and the cache equals an uninterrupted run's."""
    from safetensors.torch import load_file

    from medvl.distill import teacher as T
    data = load_bundled("vqa-rad", "train")[:14]
    T.cache_teacher(teacher_dir, data, tmp_path / "full", topk=8, batch_size=3, progress=False, part_size=4)
    real_save, saved = T.atomic_write_text, []

    def dying(path, text):  # the run is killed after its second part is whole
        real_save(path, text)
        saved.append(path)
        if len(saved) == 2:
            (Path(path).parent / "part-00002.safetensors.tmp").write_bytes(b"torn")
            raise KeyboardInterrupt
    monkeypatch.setattr(T, "atomic_write_text", dying)
    with pytest.raises(KeyboardInterrupt):
        T.cache_teacher(teacher_dir, data, tmp_path / "killed", topk=8, batch_size=3, progress=False, part_size=4)
    monkeypatch.setattr(T, "atomic_write_text", real_save)
    assert not (tmp_path / "killed" / "index.json").exists()  # no cache that looks whole
    calls = []
    live = T.live_teacher
    monkeypatch.setattr(T, "live_teacher", lambda *a, **k: _counting(live(*a, **k), calls))
    info = T.cache_teacher(teacher_dir, data, tmp_path / "killed", topk=8, batch_size=3, progress=False, part_size=4)
    assert info["samples"] == 14 and sum(calls) == 14 - 8  # the two finished parts were kept
    a, b = load_file(str(tmp_path / "full" / "teacher_topk.safetensors")), \
        load_file(str(tmp_path / "killed" / "teacher_topk.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "index.json").read_text())["ids"] == \
        json.loads((tmp_path / "killed" / "index.json").read_text())["ids"]
    assert not (tmp_path / "killed" / "parts").exists()
    with pytest.raises(MedvlUserError, match="another run"):  # parts of another k are refused, not mixed
        (tmp_path / "k2" / "parts").mkdir(parents=True)
        (tmp_path / "k2" / "parts" / "part-00000.json").write_text(json.dumps({"teacher": str(teacher_dir), "k": 4,
                                                                               "ids": [], "counts": []}))
        T.cache_teacher(teacher_dir, data, tmp_path / "k2", topk=8, progress=False)


def _counting(live, calls):
    rows = live.rows

    def counted(ids):
        calls.append(len(ids))
        return rows(ids)
    live.rows = counted
    return live


def test_distill_config_errors(teacher_dir, tmp_path):
    from medvl.train.vlm import train_vlm
    data = load_bundled("vqa-rad", "train")[:8]
    with pytest.raises(MedvlUserError, match="exactly one of teacher"):
        train_vlm(_student(tmp_path, distill={"alpha": 0.5}), data, progress=False)
    with pytest.raises(MedvlUserError, match="unknown key"):
        train_vlm(_student(tmp_path, distill={"teacher": str(teacher_dir), "alfa": 1}), data, progress=False)
    with pytest.raises(MedvlUserError, match="not a teacher cache"):
        train_vlm(_student(tmp_path, distill={"teacher_cache": str(tmp_path)}), data, progress=False)


def test_pseudo_labels_filter_and_keep_the_reference(teacher_dir, tmp_path):
    from medvl.distill.pseudo import pseudo_label
    data = load_bundled("vqa-rad", "test")[:12]
    kept, rep = pseudo_label(teacher_dir, data, progress=False)
    assert rep["kept"] + rep["empty_answer"] == 12 and len(kept) == rep["kept"] > 0
    if kept:
        k = kept[0]
        assert k.conversation[-1].role == "assistant" and "reference_answer" in k.meta
        assert 0 < k.meta["pseudo_label"]["confidence"] <= 1
    none, rep2 = pseudo_label(teacher_dir, data, min_confidence=1.01, progress=False)
    assert none == [] and rep2["low_confidence"] == rep["kept"]
    _, rep3 = pseudo_label(teacher_dir, data, agreement=3, min_agreement=1.01, progress=False)
    assert rep3["kept"] == 0 and rep3["low_agreement"] == rep["kept"]


def test_cli_pseudo_label_and_cache_teacher(teacher_dir, tmp_path, capsys):
    from medvl.cli import main
    from medvl.data.schema import read_jsonl
    assert main(["distill", "pseudo-label", "--teacher", str(teacher_dir), "--data", "vqa-rad/test",
                 "--out", str(tmp_path / "pl.jsonl"), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and len(read_jsonl(tmp_path / "pl.jsonl")) > 0
    assert main(["distill", "cache-teacher", "--teacher", str(teacher_dir), "--data", "vqa-rad/test",
                 "--out", str(tmp_path / "c"), "--topk", "4"]) == 0
    assert (tmp_path / "c" / "teacher_topk.safetensors").exists()
    assert main(["distill", "cache-teacher", "--teacher", str(tmp_path / "nope"), "--data", "vqa-rad/test",
                 "--out", str(tmp_path / "c2")]) == 2


def test_correction_samples_learn_only_the_correct_answer(teacher_dir):
    from medvl.data.collate import VLMCollator
    from medvl.distill.reflect import REFLECT_PROMPT, correction_samples, is_mistake
    from medvl.models.hub import load_model_tokenizer
    assert is_mistake("no", "yes", "CLOSED") and not is_mistake("yes, it is", "yes", "CLOSED")
    assert is_mistake("left lung", "right kidney", "OPEN") and not is_mistake("the right kidney", "right kidney")
    assert is_mistake("<|box_start|>(0,0),(10,10)<|box_end|>", "[50, 50, 90, 90]", task="grounding")
    assert not is_mistake("[0, 0, 10, 10]", "[0, 0, 10, 11]", task="grounding")
    data = load_bundled("vqa-rad", "train")[:6]
    preds = {s.id: ("maybe" if i % 2 else s.conversation[-1].text) for i, s in enumerate(data)}
    fixes, counts = correction_samples(data, preds, 1)
    assert counts["answered"] == 6 and len(fixes) == counts["wrong_by_metric"] == 3
    f = fixes[0]
    assert [t.role for t in f.conversation] == ["user", "assistant", "user", "assistant"]
    assert f.conversation[1].text == "maybe" and f.conversation[2].text == REFLECT_PROMPT
    tok = load_model_tokenizer(teacher_dir)
    col = VLMCollator(tok, tokens_per_image=4, max_length=256)
    e = col.encode(f)
    learned = tok.decode([t for t in e.labels if t != -100])
    assert f.conversation[-1].text in learned and "maybe" not in learned


def test_reflective_rounds_run_and_log(tmp_path):
    from medvl.train.reflect import run_reflective
    cfg = _tiny_cfg(tmp_path, reflect={"rounds": 1, "epochs": 1}, output_dir=str(tmp_path / "r"))
    res = run_reflective(cfg, load_bundled("vqa-rad", "train")[:16], progress=False)
    log = [json.loads(x) for x in (tmp_path / "r" / "reflection.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["answered"] == 16 and log[0]["corrections"] == log[0]["wrong_by_metric"]
    assert (tmp_path / "r" / "round1" / "model" / "model.safetensors").exists() and res["steps"] >= 2


def test_sasg_picks_the_semantic_consensus_and_predicts(teacher_dir, tmp_path):
    from medvl.generate.sasg import SentenceEncoder, select
    enc = SentenceEncoder()
    assert select(["no", "yes", "yes it is", "yes"], enc) in (1, 3)
    assert select(["left lung", "right kidney", "the liver"], enc, reference="kidney on the right") == 1
    from medvl.cli import main
    assert main(["predict", "--model", str(teacher_dir), "--data", "vqa-rad/test", "--out", str(tmp_path / "p.jsonl"),
                 "--sasg", "3", "--max-new-tokens", "4"]) == 0
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 451 and len({json.loads(x)["id"] for x in lines}) == 451


def test_every_vlm_recipe_parses_with_known_distill_and_reflect_keys():
    from pathlib import Path

    import yaml

    from medvl.train.config import load_recipe
    from medvl.distill.teacher import DISTILL_KEYS
    from medvl.train.vlm import VLMTrainConfig
    n = 0
    for path in sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")):
        if yaml.safe_load(path.read_text()).get("recipe") not in ("vlm", "vlm-distill"):
            continue
        cfg = load_recipe(VLMTrainConfig, path, ["distill.teacher_cache=x"] if "distill" in path.name else [])
        assert set(cfg.distill) <= DISTILL_KEYS
        assert set(cfg.reflect) <= {"rounds", "epochs", "task", "f1_threshold", "semantic_threshold"}
        n += 1
    assert n >= 6


def test_cached_teacher_rows_inside_bf16_autocast(teacher_dir, tmp_path):
    """The trainer asks for teacher rows inside its bf16 autocast; the cache's fp16 rows must come out."""
    from medvl.data.bundled import load_bundled
    from medvl.distill.teacher import CachedTeacher, cache_teacher
    data = load_bundled("vqa-rad", "train")[:4]
    cache_teacher(teacher_dir, data, tmp_path / "c", topk=4, progress=False)
    t = CachedTeacher(tmp_path / "c")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = t.rows([s.id for s in data])
    assert rows.values.shape[1] == 4 and rows.values.shape[0] == rows.indices.shape[0]
