"""Evaluation speed against the reference implementations, same data, same run.

    python benchmarks/bench_eval.py [--pairs 2000] [--bertscore-pairs 2000] [--skip-bertscore]

Data: ``examples.big(n)`` from ``shared/data/metric_fixtures`` (report-length pairs,
~37 words), R2Gen-cleaned once for both sides.

1. BLEU-1..4 + ROUGE-L + CIDEr-D + METEOR end to end: medvl (native METEOR; and again
   with the jar through medvl's long-lived JVM) against pycocoevalcap's ``Bleu(4)``,
   ``Rouge``, ``Cider``, ``Meteor`` (JVM start included, as a user pays it). BLEU / ROUGE-L
   / CIDEr-D values must be identical.
2. The CheXpert labeler: reports/s on one core (pure Python, single thread).
3. BERTScore with all-MiniLM-L6-v2, layer 6, batch 64: medvl against ``bert_score``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "metric_fixtures"))
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--bertscore-pairs", type=int, default=2000)
    ap.add_argument("--skip-bertscore", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "eval.json"))
    args = ap.parse_args()
    sys.path.insert(0, args.fixtures)
    from examples import big  # noqa: E402  (the study's deterministic timing set)

    import torch
    torch.set_num_threads(2)
    from medvl.eval import meteor as met
    from medvl.eval.nlg import bleu, cider_d, rouge_l
    from medvl.eval.text import normalise

    refs_raw, hyps_raw = big(args.pairs)
    R, H = normalise(refs_raw, "r2gen"), normalise(hyps_raw, "r2gen")
    results: dict = {"pairs": args.pairs, "cpu_count": os.cpu_count()}

    # -- 1. n-gram suite -----------------------------------------------------------------
    def ours_native():
        return bleu(R, H), rouge_l(R, H), cider_d(R, H), met.meteor_native(R, H)

    (ob, orl, oc, om), t_native = timed(ours_native)

    def ours_jar():
        met.MeteorJar._instance = None  # pay the JVM start, like the reference
        return bleu(R, H), rouge_l(R, H), cider_d(R, H), met.meteor_jar(R, H)

    (_, _, _, ojm), t_jar = timed(ours_jar)
    met.MeteorJar.shared().close()

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    gts = {i: [r] for i, r in enumerate(R)}
    res = {i: [h] for i, h in enumerate(H)}

    def reference():
        b = Bleu(4).compute_score(gts, res, verbose=0)
        r = Rouge().compute_score(gts, res)
        c = Cider().compute_score(gts, res)
        m = Meteor()
        s = m.compute_score(gts, res)
        return b, r, c, s

    (pb, pr, pc, pm), t_ref = timed(reference)
    same = (all(abs(a - ob[f"bleu{k + 1}"]) < 1e-12 for k, a in enumerate(pb[0]))
            and abs(pr[0] - orl["rouge_l"]) < 1e-12 and abs(pc[0] - oc["cider_d"]) < 1e-9)
    results["ngram_suite"] = {
        "medvl_native_meteor_s": t_native, "medvl_jar_meteor_s": t_jar, "pycocoevalcap_s": t_ref,
        "speedup_native": t_ref / t_native, "speedup_jar": t_ref / t_jar, "identical_bleu_rouge_cider": bool(same),
        "meteor_jar_ours": ojm["meteor"], "meteor_jar_reference": pm[0], "meteor_native": om["meteor_native"],
        "bleu4": ob["bleu4"], "rouge_l": orl["rouge_l"], "cider_d": oc["cider_d"]}

    # -- 2. CheXpert labeler --------------------------------------------------------------
    from medvl.eval.chexpert import CheXpertLabeler
    lab = CheXpertLabeler()
    texts = refs_raw + hyps_raw
    _, t_lab = timed(lambda: lab.label_many(texts))
    results["chexpert_labeler"] = {"reports": len(texts), "seconds": t_lab, "reports_per_s": len(texts) / t_lab}

    # -- 3. BERTScore ----------------------------------------------------------------------
    if not args.skip_bertscore:
        import bert_score

        from medvl.eval.bertscore import BERTScorer, default_model_path
        br, bh = refs_raw[:args.bertscore_pairs], hyps_raw[:args.bertscore_pairs]
        scorer = BERTScorer(batch_size=64)
        o, t_o = timed(lambda: scorer.score(br, bh))
        (P, Rr, F), t_b = timed(lambda: bert_score.score(bh, br, model_type=default_model_path(), num_layers=6,
                                                          batch_size=64))
        diff = max(abs(a - b) for a, b in zip(o["per_sample"]["f1"], F.tolist()))
        results["bertscore"] = {"pairs": len(br), "medvl_s": t_o, "bert_score_s": t_b, "time_ratio": t_o / t_b,
                                "max_abs_f1_diff": diff}

    s = results["ngram_suite"]
    print(f"BLEU+ROUGE-L+CIDEr-D+METEOR, {args.pairs} pairs: medvl {s['medvl_native_meteor_s']:.2f} s (native METEOR), "
          f"{s['medvl_jar_meteor_s']:.2f} s (jar), pycocoevalcap {s['pycocoevalcap_s']:.2f} s -> "
          f"{s['speedup_native']:.1f}x / {s['speedup_jar']:.1f}x; identical BLEU/ROUGE-L/CIDEr-D: "
          f"{s['identical_bleu_rouge_cider']}; METEOR jar ours {s['meteor_jar_ours']:.6f} vs reference "
          f"{s['meteor_jar_reference']:.6f}, native {s['meteor_native']:.6f}")
    c = results["chexpert_labeler"]
    print(f"CheXpert labeler: {c['reports_per_s']:.0f} reports/s ({c['reports']} reports, one thread)")
    if "bertscore" in results:
        b = results["bertscore"]
        print(f"BERTScore MiniLM L6, {b['pairs']} pairs, batch 64: medvl {b['medvl_s']:.1f} s, bert_score "
              f"{b['bert_score_s']:.1f} s -> time ratio {b['time_ratio']:.2f}; max |dF1| {b['max_abs_f1_diff']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
