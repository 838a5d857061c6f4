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
    # log_every 5: each line is the mean over its steps (the same run's per-step losses), the last line
    # takes the 4 steps after step 20
    _run(tmp_path / "b", log_every=5)
    five = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in five] == [5, 10, 15, 20, 24]
    losses = [r["loss"] for r in rows]
    assert five[0]["loss"] == pytest.approx(sum(losses[:5]) / 5, rel=1e-5)
    assert five[-1]["loss"] == pytest.approx(sum(losses[20:]) / 4, rel=1e-5)


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


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run killed after logging steps past its last checkpoint logged them again on resume (46 lines
    for 40 steps): the log is cut back to the checkpoint's step."""
    _run(tmp_path / "r", stop_after_steps=10)  # checkpoint at step 10
    log = tmp_path / "r" / "metrics.jsonl"
    extra = [json.dumps({"step": s, "loss": 9.9}) for s in (11, 12, 13)]  # logged after the checkpoint, then killed
    log.write_text(log.read_text() + "\n".join(extra) + "\n" + '{"step": 14, "lo')  # the last line torn
    _, res = _run(tmp_path / "r")
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 25)) and res["steps"] == 24
    assert all(json.loads(x)["loss"] != 9.9 for x in log.read_text().splitlines())


def test_resume_refuses_another_run_or_engine(tmp_path):
    from medvl.train.engine import checkpoint
    _run(tmp_path / "r", max_steps=2)
    with pytest.raises(MedvlUserError, match="different run.*lr"):
        _run(tmp_path / "r", lr=0.01)
    st = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    other = {"run": st["identity"]["run"], "engine": {"world": 2, "distributed": "fsdp"}}
    with pytest.raises(MedvlUserError, match="same number of processes"):
        checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt", other)
    # a checkpoint from before a recipe key existed resumes while that key stays at its default
    older = {"run": {k: v for k, v in st["identity"]["run"].items() if k != "clip_grad"},
             "engine": st["identity"]["engine"]}
    checkpoint.check_identity(older, st["identity"], tmp_path / "r")
    changed = {**st["identity"], "run": {**st["identity"]["run"], "clip_grad": 0.5}}
    with pytest.raises(MedvlUserError, match="differs in: clip_grad"):
        checkpoint.check_identity(older, changed, tmp_path / "r")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedvlUserError, match="cannot read the checkpoint"):
        checkpoint.load(tmp_path / "bad" / "last.pt", other)


def test_memory_estimate_follows_the_sharding_and_advice_names_the_knobs():
    from medvl.train.engine import memory
    m = nn.Linear(1000, 1000)  # 1,001,000 parameters
    single = memory.estimate(m, world=1, mode="ddp", sharding="full")
    assert single.params == 4 * 1_001_000 and single.grads == single.params and single.optimizer == 2 * single.params
    z3 = memory.estimate(m, world=4, mode="fsdp", sharding="full", activations=1e6)
    z2 = memory.estimate(m, world=4, mode="fsdp", sharding="grad_op")
    assert z3.params == single.params / 4 and z2.params == single.params and z2.optimizer == single.optimizer / 4
    assert "activations 0.00 GB" in z2.line() and z3.total > z3.params
    for p in m.parameters():
        p.requires_grad = False
    assert memory.estimate(m, world=1, mode="ddp", sharding="full").grads == 0
    advice = memory.oom_advice(TrainerConfig(batch_size=32), single, 7)
    assert "step 7" in advice and "batch_size (now 32)" in advice and "fsdp" in advice and "lora" in advice


def test_bad_engine_settings_are_user_errors(tmp_path):
    for kw, msg in (({"precision": "fp16"}, "precision"), ({"grad_accum": 0}, "grad_accum"),
                    ({"lr_schedule": "linear-ish"}, "lr_schedule")):
        with pytest.raises(MedvlUserError, match=msg):
            Engine(TrainerConfig(output_dir=str(tmp_path), **kw), name="x")


@pytest.mark.slow
def test_fsdp_run_resumes_from_its_gathered_checkpoint(tmp_path):
    """vlm recipe on 2 CPU processes: FSDP2 stopped after epoch 1 and resumed equals uninterrupted, and equals
    one process with the same global batch; a single process refuses the 2-process checkpoint; DDP stopped
    and resumed equals FSDP."""
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
              "num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}", "allow_frozen_random=true"]

    def run(out, *extra, nproc=2, port=29561):
        launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
                  if nproc > 1 else [sys.executable])
        return subprocess.run(launch + ["-m", "medvl.cli", "train", recipe, f"output_dir={out}", *common, *extra],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    r = run(tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "one", "batch_size=8", nproc=1)  # one process, the same global batch
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "b", "stop_after_epochs=1", port=29562)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(tmp_path / "b", nproc=1)
    assert r.returncode == 2 and "same number of processes" in r.stderr
    r = run(tmp_path / "b", port=29563)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    a, b = load_vlm(tmp_path / "a" / "model").state_dict(), load_vlm(tmp_path / "b" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    one = load_vlm(tmp_path / "one" / "model").state_dict()  # ranks weighted by their answer tokens
    assert all(torch.allclose(a[k], one[k], atol=1e-5) for k in a)
    for k, extra in enumerate((["distributed=ddp", "stop_after_epochs=1"], ["distributed=ddp"])):  # DDP resumes too
        r = run(tmp_path / "ddp", *extra, port=29564 + k)
        assert r.returncode == 0, r.stderr[-3000:]
    d = load_vlm(tmp_path / "ddp" / "model").state_dict()
    assert all(torch.allclose(a[k], d[k], atol=1e-5) for k in a)


def test_deepspeed_config_follows_the_recipe_and_refuses_contradictions(tmp_path):
    from medvl.train.engine.zero import build_config
    cfg = TrainerConfig(batch_size=4, grad_accum=2, precision="bf16", clip_grad=1.0,
                        deepspeed={"zero_optimization": {"stage": 3}})
    ds = build_config(cfg, world=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 1.0
    f = tmp_path / "ds.json"
    for bad, msg in (({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8"),
                     ({"train_batch_size": 99}, "train_batch_size=99"),
                     ({"bf16": {"enabled": False}}, "bf16.enabled"),
                     ({"fp16": {"enabled": True}}, "fp16"),
                     ({"optimizer": {"type": "Adam"}}, "optimizer"),
                     ({"zero_optimization": {"stage": 5}}, "stage")):
        f.write_text(json.dumps(bad))
        with pytest.raises(MedvlUserError, match=msg):
            build_config(TrainerConfig(batch_size=4, grad_accum=2, precision="bf16", deepspeed={"config": str(f)}),
                         world=2)
    with pytest.raises(MedvlUserError, match="not found"):
        build_config(TrainerConfig(deepspeed={"config": str(tmp_path / "none.json")}), world=1)


def _vlm_cmd(recipe_args, nproc, port):
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
              if nproc > 1 else [sys.executable])
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "vlm-sft-vqarad.yaml")
    return launch + ["-m", "medvl.cli", "train", recipe, *recipe_args]


TINY_VLM = ["vocab_size=300", "precision=fp32", "warmup_steps=1",
            "vision={name: hf, hf_config: {model_type: siglip_vision_model, hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 1, num_attention_heads: 2, image_size: 32, patch_size: 8}}",
            "llm={model_type: qwen2, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
            "num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}", "allow_frozen_random=true"]


@pytest.mark.slow
def test_deepspeed_zero2_zero3_one_and_two_processes_resume_and_refusals(tmp_path):
    """The vlm recipe under DeepSpeed on CPU: ZeRO-2 and ZeRO-3 on 2 processes export the same weights, and
    the same as 1 process with the same global batch (ranks weighted by their answer tokens);
    a ZeRO-3 run stopped after epoch 1 and resumed equals the uninterrupted one; another engine refuses
    its checkpoint."""
    pytest.importorskip("deepspeed")
    from medvl.data.bundled import load_bundled
    from medvl.data.schema import write_jsonl
    from medvl.models.vlm import load_vlm
    write_jsonl(load_bundled("vqa-rad", "train")[:16], tmp_path / "d.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, nproc, batch, *extra, port=29571):
        args = [f"data.path={tmp_path / 'd.jsonl'}", f"output_dir={tmp_path / out}", "distributed=deepspeed",
                "epochs=2", f"batch_size={batch}", "group_by_length=false", *TINY_VLM, *extra]
        return subprocess.run(_vlm_cmd(args, nproc, port), capture_output=True, text=True, timeout=600, env=env)

    for out, nproc, batch, stage, port in (("z2", 2, 4, 2, 29571), ("z3", 2, 4, 3, 29572), ("one", 1, 8, 2, 0)):
        r = run(out, nproc, batch, f"deepspeed={{zero_optimization: {{stage: {stage}}}}}", port=port)
        assert r.returncode == 0, r.stderr[-3000:]
    w = {k: load_vlm(tmp_path / k / "model").state_dict() for k in ("z2", "z3", "one")}
    assert all(torch.allclose(w["z2"][k], w["z3"][k], atol=1e-5) for k in w["z2"])
    assert all(torch.allclose(w["z2"][k], w["one"][k], atol=1e-5) for k in w["z2"])
    r = run("z3b", 2, 4, "deepspeed={zero_optimization: {stage: 3}}", "stop_after_epochs=1", port=29573)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("z3b", 1, 4, "distributed=ddp")  # another engine and world size: refused, nothing overwritten
    assert r.returncode == 2 and "same number of processes" in r.stderr
    r = run("z3b", 2, 4, "deepspeed={zero_optimization: {stage: 3}}", port=29574)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    b = load_vlm(tmp_path / "z3b" / "model").state_dict()
    assert all(torch.allclose(w["z3"][k], b[k], atol=1e-6) for k in b)


@pytest.mark.slow
def test_deepspeed_runs_the_clip_recipe_and_a_native_vlm(tmp_path):
    pytest.importorskip("deepspeed")
    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_clip import _caption_data
    from test_native_vlm import tiny_llava
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    caps = _caption_data(tmp_path, 16)
    clip_recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "medclip-r10t-minilm-vqamed.yaml")
    r = subprocess.run([sys.executable, "-m", "medvl.cli", "train", clip_recipe, "model=test-tiny",
                        "data.format=captions", f"data.path={caps}", "data.exclude_images_of=", "data.text_mode=caption",
                        "max_steps=2", "batch_size=4", "precision=fp32", "warmup_steps=1", "distributed=deepspeed",
                        f"output_dir={tmp_path / 'clip'}"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "clip" / "model" / "model.safetensors").exists()
    assert (tmp_path / "clip" / "checkpoints" / "deepspeed" / "identity.json").exists()
    tiny_llava().save(tmp_path / "llava")
    from medvl.data.bundled import load_bundled
    from medvl.data.schema import write_jsonl
    write_jsonl(load_bundled("vqa-rad", "train")[:8], tmp_path / "d.jsonl")
    r = subprocess.run(_vlm_cmd([f"native={tmp_path / 'llava'}", f"data.path={tmp_path / 'd.jsonl'}", "epochs=1",
                                 "batch_size=4", "precision=fp32", "distributed=deepspeed",
                                 "deepspeed={zero_optimization: {stage: 3}}", f"output_dir={tmp_path / 'native'}"],
                                1, 0), capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    from medvl.models.native import NativeVLM
    assert len(NativeVLM.from_pretrained(tmp_path / "native" / "model").generate(
        load_bundled("vqa-rad", "test")[:1], max_new_tokens=2)) == 1
