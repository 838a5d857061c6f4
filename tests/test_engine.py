"""The trainer engine on its own (a tiny regression module) and through the vlm recipe:
schedules, accumulation, mid-epoch exact resume, refusals, FSDP checkpoints on 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medvl.errors import MedvlUserError
from medvl.train.config import TrainerConfig
from medvl.train.engine import Engine, StepResult
from medvl.train.engine.schedule import get_schedule

X = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
Y = X @ torch.arange(8.0)


class _Reg(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.lin(x).squeeze(-1), y)


def _run(out: Path, **kw) -> tuple[Engine, dict]:
    cfg = TrainerConfig(**{"epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_steps": 2, "precision": "fp32",
                           "log_every": 1, "output_dir": str(out), **kw})
    eng = Engine(cfg, name="reg", progress=False)
    torch.manual_seed(0)
    eng.setup(_Reg())

    def plan(epoch):
        return eng.global_batches(torch.randperm(len(X), generator=eng.plan_gen).tolist())

    def step(idx):
        noise = torch.randn(len(idx), generator=eng.rank_gen) * 0.01  # per-rank randomness is checkpointed too
        return StepResult(eng.module(X[idx], Y[idx] + noise), len(idx), tokens=len(idx) * 4)

    return eng, eng.fit(steps_per_epoch=eng.steps_per_epoch(len(X)), plan=plan, step=step)


def test_schedules_by_exact_name():
    assert get_schedule("cosine")(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert get_schedule("cosine")(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert get_schedule("cosine")(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert get_schedule("ramped_cosine")(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert get_schedule("constant")(50, 100, 10, 1.0) == 1.0
    with pytest.raises(MedvlUserError, match="lr_schedule"):
        get_schedule("Cosine")


def test_loop_logs_plots_counts_flops_and_learns(tmp_path):
    eng, res = _run(tmp_path / "a")
    assert res["steps"] == 24 and res["finished"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[-1]["loss"] < rows[0]["loss"] / 2
    assert rows[-1]["tokens_per_s"] > 0 and 0 < rows[-1]["mfu"] < 1  # FLOPs counted on the first step
    assert (tmp_path / "a" / "training_loss.png").exists()


def test_accumulation_and_exact_mid_epoch_resume(tmp_path):
    _, full = _run(tmp_path / "full", grad_accum=2)
    assert full["steps"] == 12  # 8 micro-batches per epoch, 2 per optimizer step
    _, part = _run(tmp_path / "part", grad_accum=2, stop_after_steps=5)  # stops inside epoch 2
    assert part["steps"] == 5 and not part["finished"]
    eng, rest = _run(tmp_path / "part", grad_accum=2)
    assert rest["resumed"] and rest["steps"] == 12
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["module"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)["module"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, RNG of both generators included


def test_resume_refuses_another_run_or_engine(tmp_path):
    from medvl.train.engine import checkpoint
    _run(tmp_path / "r", max_steps=2)
    with pytest.raises(MedvlUserError, match="different run.*lr"):
        _run(tmp_path / "r", lr=0.01)
    st = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    other = {"run": st["identity"]["run"], "engine": {"world": 2, "distributed": "fsdp"}}
    with pytest.raises(MedvlUserError, match="same number of processes"):
        checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt", other)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedvlUserError, match="cannot read the checkpoint"):
        checkpoint.load(tmp_path / "bad" / "last.pt", other)


def test_bad_engine_settings_are_user_errors(tmp_path):
    for kw, msg in (({"precision": "fp16"}, "precision"), ({"grad_accum": 0}, "grad_accum"),
                    ({"lr_schedule": "linear-ish"}, "lr_schedule")):
        with pytest.raises(MedvlUserError, match=msg):
            Engine(TrainerConfig(output_dir=str(tmp_path), **kw), name="x")


@pytest.mark.slow
def test_fsdp_run_resumes_from_its_gathered_checkpoint(tmp_path):
    """vlm recipe, FSDP2 on 2 CPU processes: stopped after epoch 1 and resumed equals uninterrupted;
    a single process refuses to resume the 2-process checkpoint."""
    from medvl.data.bundled import load_bundled
    from medvl.data.schema import write_jsonl
    from medvl.models.vlm import load_vlm
    write_jsonl(load_bundled("vqa-rad", "train")[:16], tmp_path / "d.jsonl")
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "vlm-sft-vqarad.yaml")
    common = [f"data.path={tmp_path / 'd.jsonl'}", "distributed=fsdp", "epochs=2", "batch_size=4",
              "precision=fp32", "vocab_size=300", "warmup_steps=1",
              "vision={name: hf, hf_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64, "
              "num_hidden_layers: 1, num_attention_heads: 2, image_size: 32, patch_size: 8}}",
              "llm={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
              "num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}"]

    def run(out, *extra, nproc=2, port=29561):
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
                  if nproc > 1 else [sys.executable])
        return subprocess.run(launch + ["-m", "medvl.cli", "train", recipe, f"output_dir={out}", *common, *extra],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    r = run(tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "b", "stop_after_epochs=1", port=29562)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "b", nproc=1)
    assert r.returncode == 2 and "same number of processes" in r.stderr
    r = run(tmp_path / "b", port=29563)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    a, b = load_vlm(tmp_path / "a" / "model").state_dict(), load_vlm(tmp_path / "b" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
