"""A loaded VLM ready to answer: model + tokenizer + collator + image loader.

``medvl.load(path)`` returns a :class:`VLMPipeline`; ``medvl predict`` and ``medvl chat``
use the same object. Images may be any file medvl reads (PNG/JPEG, DICOM, NIfTI, .npy).

``precision``: ``fp32`` (the default of ``predict`` / ``chat``, what the model cards report),
``bf16`` or ``auto`` (bf16 where the device computes it natively, as ``medvl serve`` does);
see :mod:`medvl.models.precision`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medvl.data.schema import Media, Sample, Turn
from medvl.errors import MedvlUserError
from medvl.models.hub import load_model_tokenizer, resolve_model_path
from medvl.models.precision import for_inference

class VLMPipeline:
    def __init__(self, path: str | Path, max_length: int = 512, precision: str = "fp32"):
        self.path = path
        from medvl.data.collate import VLMCollator
        from medvl.models.vlm import load_vlm
        from medvl.models.vlm import image_loader_for

        path = resolve_model_path(path)
        self.model = load_vlm(path)
        self.precision = for_inference(self.model, precision)
        self.tokenizer = load_model_tokenizer(path)
        self.collator = VLMCollator(self.tokenizer, tokens_per_image=self.model.tokens_per_image,
                                    max_length=max_length)
        self.image_fn = image_loader_for(self.model)

    def answer(self, image: str | Path | None, question: str, max_new_tokens: int = 64, **gen) -> str:
        from medvl.generate.batched import generate_answers
        images = [Media(str(image))] if image else []
        text = ("<image>\n" if image else "") + question
        s = Sample("chat", images, [Turn("user", text)])
        return next(generate_answers(self.model, self.collator, [s], self.image_fn, batch_size=1,
                                     max_new_tokens=max_new_tokens, **gen))[1]

    def answers(self, samples: Sequence[Sample], batch_size: int = 32, max_new_tokens: int = 64,
                progress: bool = False, with_confidence: bool = False, **gen):
        """(id, answer) — or (id, answer, confidence) — per sample, batched."""
        from medvl.generate.batched import generate_answers
        return generate_answers(self.model, self.collator, samples, self.image_fn, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, progress=progress, with_confidence=with_confidence,
                                **gen)

    def predict(self, samples: Sequence[Sample], out: str | Path, batch_size: int = 32,
                max_new_tokens: int = 64, progress: bool = True, layout: str = "medvl", **gen) -> int:
        from medvl.generate.batched import predict_to_file
        return predict_to_file(self.model, self.collator, samples, self.image_fn, out, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress, layout=layout,
                               model_id=Path(str(self.path)).name, **gen)


    def predict_sasg(self, samples: Sequence[Sample], out: str | Path, n: int = 5, temperature: float = 0.7,
                     top_p: float = 0.9, seed: int = 0, progress: bool = True, layout: str = "medvl", **gen) -> int:
        """Like :meth:`predict`, each answer chosen by SASG among ``n`` samples (resumable too)."""
        from medvl.generate.batched import append_predictions
        from medvl.generate.sasg import sasg_answers
        return append_predictions(out, samples, lambda todo: sasg_answers(
            self.model, self.collator, todo, self.image_fn, n=n, temperature=temperature, top_p=top_p, seed=seed,
            progress=progress, **gen), layout=layout, model_id=Path(str(self.path)).name)


class NativePipeline:
    """The same interface over a native Hugging Face VLM folder (LLaVA, Qwen2-VL ...): its own
    processor and ``generate``, batched and left-padded (:class:`medvl.models.native.NativeVLM`)."""

    def __init__(self, path: str | Path, precision: str = "fp32"):
        from medvl.models.native import NativeVLM
        self.path = path
        self.native = NativeVLM.from_pretrained(resolve_model_path(path))
        self.precision = for_inference(self.native.model, precision)
        self.tokenizer = self.native.tok
        self.collator = None

    def answer(self, image: str | Path | None, question: str, max_new_tokens: int = 64, **gen) -> str:
        images = [Media(str(image))] if image else []
        s = Sample("chat", images, [Turn("user", ("<image>\n" if image else "") + question)])
        return self.native.generate([s], batch_size=1, max_new_tokens=max_new_tokens, **gen)[0]

    def predict(self, samples: Sequence[Sample], out: str | Path, batch_size: int = 16, max_new_tokens: int = 64,
                progress: bool = True, tower_precision: str = "fp32", layout: str = "medvl", **gen) -> int:
        from medvl.generate.batched import append_predictions

        def answer(todo):
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                yield from zip([s.id for s in chunk], self.native.generate(chunk, batch_size=batch_size,
                                                                           max_new_tokens=max_new_tokens, **gen))
        return append_predictions(out, samples, answer, layout=layout, model_id=Path(str(self.path)).name)

    def answers(self, samples: Sequence[Sample], batch_size: int = 16, max_new_tokens: int = 64,
                progress: bool = False, with_confidence: bool = False, tower_precision: str = "fp32", **gen):
        """(id, answer) — or (id, answer, confidence) — per sample, batched through the model's generate."""
        from tqdm.auto import tqdm
        for i in tqdm(range(0, len(samples), batch_size), desc="generating", unit="batch", disable=not progress):
            chunk = samples[i:i + batch_size]
            got = self.native.generate(chunk, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       with_confidence=with_confidence, **gen)
            for s, g in zip(chunk, got):
                yield (s.id, *g) if with_confidence else (s.id, g)

    def predict_sasg(self, samples: Sequence[Sample], out: str | Path, n: int = 5, temperature: float = 0.7,
                     top_p: float = 0.9, seed: int = 0, progress: bool = True, batch_size: int = 16,
                     max_new_tokens: int = 64, layout: str = "medvl", **gen) -> int:
        """SASG on a native model: ``n`` sampled answers per question, the semantic consensus kept."""
        from medvl.generate.batched import append_predictions
        from medvl.generate.sasg import sasg_consensus
        gen.pop("tower_precision", None)
        return append_predictions(out, samples, lambda todo: sasg_consensus(todo, lambda expanded: self.answers(
            expanded, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
            top_p=top_p, **gen), n=n, seed=seed), layout=layout, model_id=Path(str(self.path)).name)


def load(path: str | Path, precision: str = "fp32") -> VLMPipeline | NativePipeline:
    """A composed medvl VLM folder, a native Hugging Face VLM folder, or a shipped model's name;
    ``precision``: fp32, bf16 or auto (module docstring)."""
    import json
    folder = resolve_model_path(path)
    try:
        mtype = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise MedvlUserError("no readable config.json: not a model folder", path=folder) from None
    return VLMPipeline(folder, precision=precision) if mtype == "medvl_vlm" else NativePipeline(folder, precision)
