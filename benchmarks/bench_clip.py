"""CLIP throughput against open_clip doing the same work, same run.

    python benchmarks/bench_clip.py [--model medclip-r10t-minilm] [--steps 10] [--batch 64]

1. Training step (image-text pairs/s): medvl's ``clip`` recipe step (cached uint8 images,
   GPU-style batched augmentation, locked-text cache) against open_clip's own step as its
   training script does it — PIL images through ``open_clip``'s train transform, both
   towers forward (a locked text tower still runs), ``ClipLoss``, backward, AdamW — on the
   same model config, batch size and images (the bundled VQA-RAD, captions from organs),
   bf16 autocast for both. Also medvl without the text cache, to show where the gain is.
2. Zero-shot embedding (images/s): ``medvl.harness.zero_shot.embed_images`` (file -> medical
   I/O -> preprocessing -> encoder) against a plain loop of PIL open + open_clip's
   eval transform + ``encode_image``, same images, batch 64.
Peak memory: the process's maximum resident set size after each part.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="medclip-r10t-minilm", help="a CLIP config name")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "clip.json"))
    args = ap.parse_args()

    import open_clip
    from PIL import Image

    from medvl.data.bundled import load_bundled
    from medvl.harness.zero_shot import embed_images
    from medvl.losses.contrastive import ClipLoss
    from medvl.models.clip import MedCLIP
    from medvl.data.pairs import Pair, decode_images
    from medvl.data.transforms import augment_batch

    seen, pairs = set(), []
    for s in load_bundled("vqa-rad", "train"):
        if s.images[0].path not in seen:
            seen.add(s.images[0].path)
            pairs.append(Pair(s.images[0].path, [f"a radiology image of the {s.labels['organ'].lower()}"]))
    B, steps = args.batch, args.steps
    results: dict = {"batch": B, "steps": steps, "images": len(pairs), "threads": torch.get_num_threads()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    # -- medvl recipe step ----------------------------------------------------------------------
    torch.manual_seed(0)
    model = MedCLIP.from_config(args.model).train()
    size = model.config.image_size
    cached, keep, _ = decode_images(pairs, int(size * 1.125), progress=False)
    texts = sorted({p.texts[0] for p in pairs})
    with torch.no_grad():
        pooled = model.text_pooled(texts).float()
    tindex = {t: i for i, t in enumerate(texts)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    loss_fn = ClipLoss()
    mean = torch.tensor(model.config.image_mean)[None, :, None, None]
    std = torch.tensor(model.config.image_std)[None, :, None, None]

    def medvl_step(k: int, use_cache: bool) -> None:
        idx = [(k * B + j) % len(keep) for j in range(B)]
        x = (augment_batch(cached[idx], size, gen) - mean) / std
        with autocast:
            img = torch.nn.functional.normalize(model.model.encode_image(x), dim=-1)
            ts = [pairs[keep[i]].texts[0] for i in idx]
            txt = model.text_from_pooled(pooled[[tindex[t] for t in ts]]) if use_cache else model.encode_text(ts)
        loss = loss_fn(img.float(), txt.float(), model.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name, cache in (("medvl_recipe", True), ("medvl_no_text_cache", False)):
        medvl_step(0, cache)  # warm-up
        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            medvl_step(k, cache)
        results[name] = {"pairs_per_s": steps * B / (time.perf_counter() - t0), "peak_rss_mb": rss_mb()}

    # -- open_clip's own step --------------------------------------------------------------------
    torch.manual_seed(0)
    ref = MedCLIP.from_config(args.model).train()  # the same open_clip model object underneath
    oc = ref.model
    train_tf = open_clip.image_transform(size, is_train=True, mean=ref.config.image_mean, std=ref.config.image_std)
    tok = ref.tokenizer
    opt2 = torch.optim.AdamW([p for p in oc.parameters() if p.requires_grad], lr=1e-4)
    oc_loss = open_clip.loss.ClipLoss()

    def open_clip_step(k: int) -> None:
        idx = [(k * B + j) % len(pairs) for j in range(B)]
        x = torch.stack([train_tf(Image.open(pairs[i].image).convert("RGB")) for i in idx])
        t = tok([pairs[i].texts[0] for i in idx])
        with autocast:
            out = oc(x, t)
        loss = oc_loss(out[0].float(), out[1].float(), out[2].float())
        opt2.zero_grad()
        loss.backward()
        opt2.step()

    open_clip_step(0)
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        open_clip_step(k)
    results["open_clip_step"] = {"pairs_per_s": steps * B / (time.perf_counter() - t0), "peak_rss_mb": rss_mb()}
    results["train_ratio"] = results["medvl_recipe"]["pairs_per_s"] / results["open_clip_step"]["pairs_per_s"]

    # -- the same step through the real recipe and its trainer engine (train_clip) ------------------
    from medvl.train.clip import ClipTrainConfig, DataConfig, train_clip
    with tempfile.TemporaryDirectory() as tmp:
        caps = Path(tmp) / "caps.jsonl"
        caps.write_text("".join(json.dumps({"image": p.image, "caption": p.texts[0]}) + "\n" for p in pairs))
        cfg = ClipTrainConfig(model=args.model, data=DataConfig(format="captions", path=str(caps)), batch_size=B,
                              max_steps=steps + 1, epochs=10_000, warmup_steps=1, lr=1e-4, weight_decay=0.0,
                              output_dir=str(Path(tmp) / "run"), log_every=steps + 1, save_every_epochs=10_000)
        res = train_clip(cfg, progress=False)  # the engine leaves the first (warm-up) step out of pairs/s
    results["medvl_engine"] = {"pairs_per_s": res["last"]["pairs_per_s"], "mfu": res["last"].get("mfu"),
                               "peak_rss_mb": rss_mb()}
    results["engine_ratio"] = results["medvl_engine"]["pairs_per_s"] / results["open_clip_step"]["pairs_per_s"]
    results["train_ratio_no_cache"] = results["medvl_no_text_cache"]["pairs_per_s"] / results["open_clip_step"]["pairs_per_s"]

    # -- zero-shot embedding -----------------------------------------------------------------------
    model.eval()
    paths = [p.image for p in pairs]
    eval_tf = open_clip.image_transform(size, is_train=False, mean=model.config.image_mean, std=model.config.image_std)
    with torch.no_grad():
        embed_images(model, paths[:64])  # warm-up
        t0 = time.perf_counter()
        X, _, _ = embed_images(model, paths, batch_size=64)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        feats = []
        for i in range(0, len(paths), 64):
            xb = torch.stack([eval_tf(Image.open(p).convert("RGB")) for p in paths[i:i + 64]])
            feats.append(model.model.encode_image(xb, normalize=True))
        t_ref = time.perf_counter() - t0
    results["zero_shot_embedding"] = {"medvl_images_per_s": len(paths) / t_ours, "open_clip_images_per_s": len(paths) / t_ref,
                                      "ratio": t_ref / t_ours, "peak_rss_mb": rss_mb()}

    r = results
    print(f"training step, {args.model}, batch {B}, bf16: medvl {r['medvl_recipe']['pairs_per_s']:.1f} pairs/s "
          f"(no text cache {r['medvl_no_text_cache']['pairs_per_s']:.1f}), open_clip {r['open_clip_step']['pairs_per_s']:.1f} "
          f"pairs/s -> {r['train_ratio']:.2f}x ({r['train_ratio_no_cache']:.2f}x without the cache); through the "
          f"recipe's engine {r['medvl_engine']['pairs_per_s']:.1f} pairs/s -> {r['engine_ratio']:.2f}x")
    z = r["zero_shot_embedding"]
    print(f"zero-shot embedding: medvl {z['medvl_images_per_s']:.1f} img/s, open_clip loop {z['open_clip_images_per_s']:.1f} "
          f"img/s -> {z['ratio']:.2f}x; peak RSS {rss_mb():.0f} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
