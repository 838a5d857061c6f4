"""The vlm recipe's ``eval`` section: which questions validate a run, and how they are scored.

``eval: {holdout: 0.1, by: sample}`` takes a seeded tenth of the training questions out of
training and scores the model on them after every epoch (``every_epochs``); ``eval: {data:
{path: val.jsonl}}`` validates on a set of its own instead (any data section). The score is
what :func:`medvl.eval.suites.evaluate_vqa` reports for greedy answers (the lean batched
decoder, as ``medvl predict``): closed accuracy, open recall and F1, exact match — and
``mean``, the mean of closed accuracy and open recall (whichever the set has), the default
``metric`` for keeping the best epoch (``keep: best``, the default with an eval section;
``keep: last`` only records). Free-text answers (captions, reports) count as open.

``by: sample`` splits by question id, as VQA-RAD's own test split does (its test images also
appear in train), so the validation set asks what the test set asks; ``by: image`` (the
default) holds whole images out, the stricter test of generalisation (VQA-Med 2019's split).
The split is by hash (:func:`medvl.data.splits.split_samples`): stable across runs, and the
question-only twin of a run holds out the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medvl.errors import MedvlUserError

KEYS = ("holdout", "by", "seed", "data", "every_epochs", "metric", "keep", "max_new_tokens", "batch_size")
METRICS = ("mean", "closed_accuracy", "open_recall", "open_f1", "open_exact", "overall_exact")


@dataclass
class ValidationPlan:
    samples: list
    every: int
    metric: str
    keep_best: bool
    max_new_tokens: int
    batch_size: int
    described: str


def plan_validation(spec: dict, samples: list, *, question_only: bool = False, native: bool = False,
                    progress: bool = False) -> tuple[list, ValidationPlan | None]:
    """(training samples, plan): the questions left for training and what validates the run. A question-only
    run (the twin) validates without images, as it trains."""
    if not spec:
        return samples, None
    if native:
        raise MedvlUserError("eval (validation during training) scores composed VLMs so far; for a native VLM, "
                             "score the exported folder with medvl eval vqa")
    samples, plan = _plan(spec, samples)
    if question_only:  # a validation set of its own comes with images
        from medvl.data.loading import strip_images
        plan.samples = strip_images(plan.samples)
    if progress:
        print(f"vlm: validating on {plan.described}; every {plan.every} epoch(s), "
              f"{'keeping the best by ' + plan.metric if plan.keep_best else 'keeping the last epoch'}")
    return samples, plan


def fit_arguments(plan: ValidationPlan | None, model, collator) -> dict:
    """What :meth:`medvl.train.engine.Engine.fit` takes to validate by this plan (nothing without one)."""
    if plan is None:
        return {}
    return {"evaluate": vqa_evaluator(model, collator, plan), "eval_every": plan.every, "eval_metric": plan.metric,
            "keep_best": plan.keep_best}


def _plan(spec: dict, samples: list) -> tuple[list, ValidationPlan]:
    if not isinstance(spec, dict):
        raise MedvlUserError(f"eval must be a mapping (holdout, by, metric, ...), got {spec!r}")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise MedvlUserError(f"eval: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    metric, keep = spec.get("metric", "mean"), spec.get("keep", "best")
    if metric not in METRICS:
        raise MedvlUserError(f"eval.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if keep not in ("best", "last"):
        raise MedvlUserError(f"eval.keep must be best or last, got {keep!r}")
    every = spec.get("every_epochs", 1)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise MedvlUserError(f"eval.every_epochs must be a whole number >= 1, got {every!r}")
    if ("data" in spec) == ("holdout" in spec):
        raise MedvlUserError("eval needs exactly one of holdout (a fraction of the training questions, e.g. 0.1) "
                             "or data (a validation set of its own: a data section)")
    if "data" in spec:
        from medvl.data.loading import load_training_samples
        val, skipped = load_training_samples(spec["data"] if isinstance(spec["data"], dict) else {"path": spec["data"]})
        described = f"{len(val):,} questions from {spec['data']}" + (f" (left out: {skipped})" if skipped else "")
        ids = {s.id for s in samples}
        overlap = sum(s.id in ids for s in val)
        if overlap:
            described += f"; warning: {overlap} of them share an id with a training sample"
        src = str(spec["data"].get("path", "") if isinstance(spec["data"], dict) else spec["data"])
        if keep == "best" and "test" in Path(src).name.lower():
            described += ("; warning: keeping the epoch best on a test split makes that split's score optimistic "
                          "— hold out training questions (eval.holdout) or set eval.keep: last")
    else:
        from medvl.data.splits import split_samples
        frac, by, seed = spec["holdout"], spec.get("by", "image"), int(spec.get("seed", 0))
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise MedvlUserError(f"eval.holdout must be a fraction in (0, 1), e.g. 0.1, got {frac!r}")
        samples, val = split_samples(samples, float(frac), seed, by)
        # copies of a held-out question (a source weight's ID#2, a question-only ID#q) are validated once,
        # as their original; a copy whose original is not in the set (a question-only source alone) stays
        ids = {s.id for s in val}
        val = [s for s in val if s.id.split("#", 1)[0] == s.id or s.id.split("#", 1)[0] not in ids]
        described = (f"{len(val):,} questions held out of training ({frac:g} by {by}, seed {seed}); "
                     f"{len(samples):,} training samples left")
    if not val:
        raise MedvlUserError(f"eval: the validation set is empty ({described})")
    if not samples:
        raise MedvlUserError("eval: holding out the validation questions leaves nothing to train on")
    return samples, ValidationPlan(val, every, metric, keep == "best", int(spec.get("max_new_tokens", 16)),
                                   int(spec.get("batch_size", 64)), described)


def vqa_evaluator(model, collator, plan: ValidationPlan) -> Callable[[], dict[str, float]]:
    """A function that answers the validation questions with ``model`` as it is now and scores them."""
    from medvl.harness.image_controls import answers
    from medvl.eval.suites import evaluate_vqa

    refs = [s.conversation[-1].text for s in plan.samples]
    types = [s.labels.get("answer_type") for s in plan.samples]

    def evaluate() -> dict[str, float]:
        preds = answers(model, collator, plan.samples, batch_size=plan.batch_size, max_new_tokens=plan.max_new_tokens)
        m = evaluate_vqa(refs, [preds[s.id] for s in plan.samples], types)["metrics"]
        out = {k: m[k] for k in METRICS[1:] if k in m}
        main = [m[k] for k in ("closed_accuracy", "open_recall") if k in m]
        out["mean"] = sum(main) / len(main) if main else m.get("overall_exact", 0.0)
        return out
    return evaluate
