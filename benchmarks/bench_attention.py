"""Attention kernels for training on this machine: eager vs sdpa, forward + backward, per length.

    python benchmarks/bench_attention.py [--lengths 48 64 96 128 256 512 1024] [--tokens 2048] [--repeats 5]

A two-block Llama of SmolLM2-135M's block shape (576 wide, 1,536 MLP, 9 heads, 3 KV heads;
random weights — the kernels' cost does not depend on the values), bf16 autocast as the
trainer runs it, half the rows left-padded by a quarter of their length (a padding mask, as
in batched SFT), batch = ``--tokens`` / length so every row of the table moves the same number
of tokens. Each configuration is warmed up twice, then timed as the mean of ``--repeats`` steps; the
same process runs both kernels on the same inputs. ``auto`` in
:mod:`medvl.train.attention` is set from this table. Results: ``benchmarks/results/attention.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def time_step(impl: str, length: int, batch: int, repeats: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=1000)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
    ids = torch.randint(0, 1000, (batch, length))  # [B, T]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[::2, :length // 4] = 0  # left padding on half the rows

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()

    step(), step()
    t = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[48, 64, 96, 128, 256, 512, 1024])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/attention.json"))
    args = ap.parse_args()
    rows = []
    print(f"{'length':>6} {'batch':>5} {'eager ms':>9} {'sdpa ms':>9} {'sdpa/eager':>10}")
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        ms = {impl: 1000 * time_step(impl, length, batch, args.repeats) for impl in ("eager", "sdpa")}
        rows.append({"length": length, "batch": batch, **{f"{k}_ms": round(v, 1) for k, v in ms.items()}})
        print(f"{length:>6} {batch:>5} {ms['eager']:>9.0f} {ms['sdpa']:>9.0f} {ms['sdpa'] / ms['eager']:>10.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "repeats": args.repeats}, indent=1))


if __name__ == "__main__":
    main()
