"""Validation during training: the engine keeps the best epoch's weights (and remembers it across a
resume), the vlm recipe's eval section splits and scores held-out questions, and bad sections are
refused with one message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medvl.data.schema import Media, Sample, Turn
from medvl.data.splits import split_samples
from medvl.errors import MedvlUserError
from medvl.train.config import TrainerConfig
from medvl.train.engine import Engine, StepResult
from medvl.train.validation import plan_validation

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.arange(8.0)
TINY_TOWER = {"name": "hf", "hf_config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                                          "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "image_size": 32, "patch_size": 8}}
TINY_LM = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
SCORES = {1: 0.2, 2: 0.9, 3: 0.4, 4: 0.5}  # epoch -> validation score: epoch 2 is the best


def _fit(out: Path, seen: dict, **kw) -> tuple[Engine, dict]:
    cfg = TrainerConfig(**{"epochs": 4, "batch_size": 16, "lr": 0.05, "warmup_steps": 1, "precision": "fp32",
                           "log_every": 1, "output_dir": str(out), **kw})
    eng = Engine(cfg, name="reg", progress=False)
    torch.manual_seed(0)
    lin = eng.setup(nn.Linear(8, 1))
    epoch = {"n": 0}

    def evaluate():  # records the weights it scored and returns the scripted score of that epoch
        assert not lin.training  # the engine puts the model in eval mode
        epoch["n"] = len(seen) + 1
        seen[epoch["n"]] = lin.weight.detach().clone()
        return {"score": SCORES[epoch["n"]], "other": 1.0}

    res = eng.fit(steps_per_epoch=eng.steps_per_epoch(len(X)),
                  plan=lambda e: eng.global_batches(torch.randperm(len(X), generator=eng.plan_gen).tolist()),
                  step=lambda i: StepResult(nn.functional.mse_loss(lin(X[i]).squeeze(-1), Y[i]), len(i)),
                  evaluate=evaluate, eval_metric="score", keep_best=True)
    assert lin.training
    return eng, res


def test_engine_keeps_the_best_epoch_and_logs_every_validation(tmp_path):
    seen: dict = {}
    eng, res = _fit(tmp_path, seen)
    assert sorted(seen) == [1, 2, 3, 4] and not torch.equal(seen[2], seen[4])
    assert torch.equal(eng.module.weight, seen[2])  # the exported model is epoch 2's
    assert res["best"]["epoch"] == 2 and res["best"]["value"] == pytest.approx(0.9)
    rows = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and [r["best"] for r in rows] == [True, True, False, False]
    assert [r["score"] for r in rows] == [SCORES[e] for e in (1, 2, 3, 4)]
    assert all("loss" in r for r in res["log"])  # the training log keeps its own rows
    assert (tmp_path / "checkpoints" / "best.pt").exists() and (tmp_path / "training_loss.png").exists()


def test_a_resumed_run_remembers_its_best_epoch(tmp_path):
    seen: dict = {}
    _fit(tmp_path, seen, stop_after_epochs=3)  # epochs 1-3; the best (2) is in the checkpoint
    assert sorted(seen) == [1, 2, 3]
    eng, res = _fit(tmp_path, seen)  # resumes at epoch 3, validates epoch 4 (0.5 < 0.9)
    assert sorted(seen) == [1, 2, 3, 4]
    assert res["best"]["epoch"] == 2 and torch.equal(eng.module.weight, seen[2])
    rows = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_an_unknown_metric_is_a_user_error(tmp_path):
    with pytest.raises(MedvlUserError, match="'nope' is not among the scores"):
        cfg = TrainerConfig(epochs=1, batch_size=16, precision="fp32", output_dir=str(tmp_path))
        eng = Engine(cfg, name="reg", progress=False)
        lin = eng.setup(nn.Linear(8, 1))
        eng.fit(steps_per_epoch=eng.steps_per_epoch(len(X)), plan=lambda e: eng.global_batches(list(range(64))),
                step=lambda i: StepResult(lin(X[i]).pow(2).mean(), len(i)), evaluate=lambda: {"score": 1.0},
                eval_metric="nope", keep_best=True)


def _samples() -> list[Sample]:
    out = []
    for img in range(20):
        for q in range(3):
            out.append(Sample(f"s{img}-{q}", [Media(f"/data/img{img}.png")],
                              [Turn("user", "<image>\nq?"), Turn("assistant", "yes")]))
    return out


def test_split_by_image_keeps_an_image_together_and_by_sample_keeps_copies_with_their_question():
    samples = _samples()
    kept, held = split_samples(samples, 0.3, seed=0, by="image")
    assert held and kept and len(kept) + len(held) == 60
    assert not {s.images[0].path for s in kept} & {s.images[0].path for s in held}
    assert split_samples(samples, 0.3, seed=0, by="image")[1] == held  # deterministic
    copies = samples + [Sample(s.id + "#2", s.images, s.conversation) for s in samples] + \
        [Sample(s.id + "#q", [], s.conversation) for s in samples]
    kept, held = split_samples(copies, 0.3, seed=1, by="sample")
    held_ids = {s.id.split("#")[0] for s in held}
    assert held_ids and not held_ids & {s.id.split("#")[0] for s in kept} and len(held) == 3 * len(held_ids)


def test_eval_section_holds_out_questions_and_refuses_bad_sections():
    samples = _samples()
    train, plan = plan_validation({"holdout": 0.25, "by": "sample", "metric": "open_recall", "keep": "last"}, samples)
    assert plan.metric == "open_recall" and not plan.keep_best and plan.every == 1
    assert len(train) + len(plan.samples) == 60 and not {s.id for s in train} & {s.id for s in plan.samples}
    assert plan_validation({}, samples) == (samples, None)
    q_only = [Sample(s.id + "#q", [], s.conversation) for s in samples]  # copies validate once, lone copies stay
    _, with_copies = plan_validation({"holdout": 0.25, "by": "sample"}, samples + q_only)
    assert {s.id for s in with_copies.samples} == {s.id for s in plan.samples}
    assert len(plan_validation({"holdout": 0.25, "by": "sample"}, q_only)[1].samples) == len(plan.samples)
    test_split = plan_validation({"data": "vqa-rad/test"}, samples)[1]  # a set of its own: nothing held out
    assert len(test_split.samples) == 451 and "optimistic" in test_split.described
    assert "optimistic" not in plan_validation({"data": "vqa-rad/test", "keep": "last"}, samples)[1].described
    for bad, msg in [({"holdout": 0.1, "metrc": "mean"}, "unknown key"), ({"metric": "mean"}, "exactly one of"),
                     ({"holdout": 0.1, "data": "x"}, "exactly one of"), ({"holdout": 1.5}, "fraction"),
                     ({"holdout": 0.1, "metric": "bleu"}, "eval.metric"), ({"holdout": 0.1, "keep": "first"}, "keep"),
                     ({"holdout": 0.1, "every_epochs": 0}, "every_epochs"), ({"holdout": 0.1, "by": "patient"},
                                                                             "by image or by sample")]:
        with pytest.raises(MedvlUserError, match=msg):
            plan_validation(bad, samples)


@pytest.mark.parametrize("llm_policy", ["full", "lora"])
def test_vlm_recipe_validates_held_out_questions_each_epoch(tmp_path, llm_policy):
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    data = load_bundled("vqa-rad", "train")[:48]
    cfg = VLMTrainConfig(vision=TINY_TOWER, llm=TINY_LM, vocab_size=300, epochs=2, batch_size=8, warmup_steps=1,
                         precision="fp32", output_dir=str(tmp_path / "vlm"), log_every=1, lr=0.01,
                         freeze={"llm": llm_policy}, allow_frozen_random=True, eval={"holdout": 0.25, "by": "sample", "max_new_tokens": 4})
    res = train_vlm(cfg, data, progress=False)
    val = res["validation"]
    assert [r["epoch"] for r in val] == [1, 2]
    assert {"closed_accuracy", "open_recall", "mean"} <= set(val[0]) and 0.0 <= val[-1]["mean"] <= 1.0
    held = sum(1 for s in data if split_samples([s], 0.25, 0, "sample")[1])
    assert 0 < held < 48 and res["steps"] == 2 * -(-(48 - held) // 8)  # trained on the other questions only
    assert res["best"]["epoch"] in (1, 2) and (tmp_path / "vlm" / "validation.jsonl").exists()
    assert (tmp_path / "vlm" / "model" / "config.json").exists()


def test_the_question_only_twin_validates_without_images(tmp_path, monkeypatch):
    import medvl.harness.image_controls as ic
    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import VLMTrainConfig, train_vlm
    asked, real = [], ic.answers
    monkeypatch.setattr(ic, "answers", lambda m, c, samples, **kw: asked.extend(samples) or real(m, c, samples, **kw))
    cfg = VLMTrainConfig(vision=TINY_TOWER, llm=TINY_LM, vocab_size=300, epochs=1, batch_size=8, warmup_steps=1,
                         precision="fp32", output_dir=str(tmp_path / "twin"), question_only=True, allow_frozen_random=True,
                         eval={"data": {"path": "vqa-rad/test"}, "keep": "last", "max_new_tokens": 2})
    res = train_vlm(cfg, load_bundled("vqa-rad", "train")[:16], progress=False)
    assert res["validation"] and 0.0 <= res["validation"][0]["mean"] <= 1.0
    assert len(asked) == 451 and not any(s.images for s in asked)
    assert not any("<image>" in t.text for s in asked for t in s.conversation)


def test_a_max_steps_run_scores_its_last_weights_too(tmp_path):
    seen: dict = {}
    _, res = _fit(tmp_path, seen, max_steps=6)  # 4 steps per epoch: epoch 1, then 2 steps into epoch 2
    assert sorted(seen) == [1, 2] and [r["step"] for r in res["validation"]] == [4, 6]
