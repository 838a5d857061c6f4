"""VLM throughput against the Hugging Face reference, same tiny model, data and machine.

    python benchmarks/bench_vlm.py [--samples 512] [--batch 32]      (needs medvl[train] for the HF Trainer)

1. SFT (samples/s): medvl's ``vlm`` recipe (stage sft: vision tower frozen and its tokens
   cached, assistant-only loss, length-grouped batches; ``--packing`` packs 512-token rows
   without cross-sample attention instead) against ``LlavaForConditionalGeneration`` trained by the
   plain Hugging Face ``Trainer`` with default padding collation (vision tower frozen too),
   one epoch over the same VQA-RAD training questions, batch 32, bf16 autocast for both.
   Architecture for both: SigLIP vision (width 128, 2 layers, 64 px, 16 patches), a
   2-layer GELU MLP projector, Qwen2 LM (width 256, 4 layers), the same BPE tokenizer.
   MFU of medvl's run is reported against the measured bf16 peak (205 GFLOP/s).
2. Evaluation generation (answers/s) on the 451 VQA-RAD test questions: medvl's batched,
   left-padded, KV-cached generation (float32, and with the tower under bf16 autocast)
   against the batch-1 loop LLaVA-Med's evaluation scripts run (transformers' ``generate``
   per question), same medvl model, greedy, 8 new tokens.
Peak memory: maximum resident set size of the process after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 64, "patch_size": 16}
QWEN = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 512}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--packing", action="store_true", help="pack samples (default: length-grouped padding)")
    ap.add_argument("--gen-model", help="also time generation for this VLM (folder or shipped name, e.g. medvl-vqarad-small)")
    ap.add_argument("--pack-length", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "vlm.json"))
    args = ap.parse_args()

    from PIL import Image
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              Qwen2Config, SiglipVisionConfig, Trainer, TrainingArguments)

    from medvl.data.bundled import load_bundled
    from medvl.train.vlm import VLMTrainConfig, train_vlm

    train = load_bundled("vqa-rad", "train")[:args.samples]
    test = load_bundled("vqa-rad", "test")
    results: dict = {"samples": len(train), "batch": args.batch, "threads": torch.get_num_threads()}
    tmp = Path(tempfile.mkdtemp(prefix="medvl-bench-vlm-"))

    # -- 1a. medvl recipe --------------------------------------------------------------------
    cfg = VLMTrainConfig(vision={"name": "hf", "hf_config": SIGLIP}, connector={"name": "mlp2x_gelu"}, llm=QWEN,
                         epochs=1, batch_size=args.batch, output_dir=str(tmp / "medvl"), warmup_steps=10,
                         log_every=1000, packing=args.packing, pack_length=args.pack_length)
    res = train_vlm(cfg, train, progress=False)
    ours = res["samples_per_s"]
    results["medvl_sft"] = {"samples_per_s": ours, "seconds": res["seconds"], "tokens_per_s": res["log"][-1]["tokens_per_s"],
                            "mfu": res["log"][-1]["mfu"], "peak_rss_mb": rss_mb()}
    tok, model, collator = res["tokenizer"], res["model"], res["collator"]

    # -- 1b. HF reference ------------------------------------------------------------------
    torch.manual_seed(0)
    image_id = tok.convert_tokens_to_ids("<image>")
    qcfg = Qwen2Config(**{k: v for k, v in QWEN.items() if k != "model_type"}, vocab_size=len(tok),
                       pad_token_id=tok.pad_token_id)
    vcfg = SiglipVisionConfig(**{k: v for k, v in SIGLIP.items() if k != "model_type"})
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vcfg, text_config=qcfg, image_token_id=image_id,
                                                      vision_feature_select_strategy="full", vision_feature_layer=-1))
    for p in llava.model.vision_tower.parameters():
        p.requires_grad = False
    ip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=16, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, chat_template=tok.chat_template)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            s = train[i]
            msgs = [{"role": t.role, "content": t.text} for t in s.conversation]
            return {"text": tok.apply_chat_template(msgs, tokenize=False), "image": Image.open(s.images[0].path).convert("RGB")}

    def collate(items):
        b = proc(images=[x["image"] for x in items], text=[x["text"] for x in items], return_tensors="pt", padding=True)
        labels = b["input_ids"].masked_fill(b["input_ids"] == image_id, -100).masked_fill(b["attention_mask"] == 0, -100)
        return {**b, "labels": labels}

    targs = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch, num_train_epochs=1,
                              learning_rate=1e-3, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                              logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False,
                              disable_tqdm=True)
    trainer = Trainer(model=llava, args=targs, train_dataset=DS(), data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    t_hf = time.perf_counter() - t0
    results["hf_trainer_sft"] = {"samples_per_s": len(train) / t_hf, "seconds": t_hf, "peak_rss_mb": rss_mb()}
    results["sft_ratio"] = ours / results["hf_trainer_sft"]["samples_per_s"]

    # -- 2. generation ------------------------------------------------------------------------
    results["generation"] = time_generation(model, collator, tok, test, args.gen_batch)
    if args.gen_model:
        from medvl.generate.pipeline import load as load_vlm_pipeline
        pipe = load_vlm_pipeline(args.gen_model)
        results["generation_" + Path(args.gen_model).name] = time_generation(pipe.model, pipe.collator, pipe.tokenizer,
                                                                            test, args.gen_batch)

    r = results
    print(f"SFT, {len(train)} samples, batch {args.batch}, bf16: medvl {r['medvl_sft']['samples_per_s']:.1f} samples/s "
          f"(MFU {r['medvl_sft']['mfu']:.1%} of 205 GFLOP/s), HF Trainer + LlavaForConditionalGeneration "
          f"{r['hf_trainer_sft']['samples_per_s']:.1f} samples/s -> {r['sft_ratio']:.2f}x")
    for key in [k for k in r if k.startswith("generation")]:
        g = r[key]
        print(f"{key}, 451 VQA-RAD test questions: batched {g['batched_answers_per_s']:.1f} answers/s, batch-1 loop "
              f"{g['batch1_answers_per_s']:.1f} -> {g['ratio']:.1f}x; identical answers {g['same_answers']:.1%}; "
              f"tower in bf16: {g['batched_bf16_tower_answers_per_s']:.1f} answers/s -> {g['ratio_bf16_tower']:.1f}x, "
              f"identical {g['same_answers_bf16_tower']:.1%}")
    print(f"peak RSS {rss_mb():.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def time_generation(model, collator, tok, test, gen_batch: int) -> dict:
    from medvl.generate.batched import generate_answers
    from medvl.models.vlm import image_loader_for
    load = image_loader_for(model)
    t0 = time.perf_counter()
    batched = dict(generate_answers(model, collator, test, load, batch_size=gen_batch, max_new_tokens=8))
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    bf16 = dict(generate_answers(model, collator, test, load, batch_size=gen_batch, max_new_tokens=8,
                                 tower_precision="bf16"))
    t_bf16 = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = {}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for s in test:  # the LLaVA-Med evaluation loop: one question at a time
        ids = torch.tensor([collator.prompt_ids(s)])
        px = torch.stack([load(m) for m in s.images])
        with torch.no_grad():
            out = model.llm.generate(inputs_embeds=model.embed(ids, px), attention_mask=torch.ones_like(ids),
                                     max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        row = out[0].tolist()
        single[s.id] = tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
    t_single = time.perf_counter() - t0
    agree = sum(batched[k] == single[k] for k in single) / len(single)
    return {"batched_answers_per_s": len(test) / t_batched, "batch1_answers_per_s": len(test) / t_single,
            "ratio": t_single / t_batched, "same_answers": agree,
            "batched_bf16_tower_answers_per_s": len(test) / t_bf16, "ratio_bf16_tower": t_single / t_bf16,
            "same_answers_bf16_tower": sum(bf16[k] == single[k] for k in single) / len(single)}


if __name__ == "__main__":
    raise SystemExit(main())
