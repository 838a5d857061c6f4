"""A small byte-level BPE tokenizer trained offline, with a ChatML template.

For language models trained from scratch on a small corpus (tests, the CPU quickstart),
where no pretrained tokenizer can be downloaded. Special tokens: ``<|pad|>``,
``<|bos|>``, ``<|eos|>``, ``<|unk|>``, ``<|im_start|>``, ``<|im_end|>``, ``<image>``.
The template renders each turn as ``<|im_start|>role\\ncontent<|im_end|>\\n`` (ChatML, as
Qwen2 uses), with the generation prompt ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

from typing import Iterable

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|im_start|>", "<|im_end|>", "<image>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>",
                                 pad_token="<|pad|>", unk_token="<|unk|>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"])
    hf.chat_template = CHATML
    return hf
