"""The composed VLM: vision tower -> connector -> any Hugging Face causal LM.

The forward is four visible steps (nanoVLM / HF ``LlavaModel`` practice):

1. embed the text ids with the LM's own embedding table;          # [B, T, D]
2. encode every image (or volume) with the vision tower;            # [n_img, N, Dv]
3. project with the connector;                                      # [n_img, M, D]
4. scatter the projected tokens into the ``<image>`` positions, then run the LM on
   ``inputs_embeds``.

Each image occupies exactly ``M`` consecutive ``<image>`` tokens (the data layer expands
one placeholder into ``M``); a count that does not match the images raises an error that
says both numbers, never a silent truncation. The LM is any ``AutoModelForCausalLM``
(Qwen2/2.5, Llama, Phi-3, Gemma ...) by hub id / local path or built from a config.

Checkpoints: ``save_pretrained`` writes ``config.json`` + ``model.safetensors``;
:func:`load_vlm` rebuilds the model from the config and loads the weights **strictly**
(missing or unexpected keys are an error that lists them, unless ``allow_missing``). A model
whose LM embeddings stayed frozen at its pretrained source's leaves them out of the checkpoint
and reads them from that source at load (:mod:`medvl.models.source_weights`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from medvl.errors import MedvlUserError
from medvl.models.connectors import ConnectorConfig, build_connector
from medvl.models.position_ids import gap_position_ids
from medvl.models.source_weights import delta_spec, split_state
from medvl.models.vision_towers import VisionConfig, build_tower


class MedVLMConfig(PretrainedConfig):
    model_type = "medvl_vlm"

    def __init__(self, vision: dict | None = None, connector: dict | None = None, text_config: dict | None = None,
                 llm_source: str | None = None, image_token_id: int | None = None, position_gap: int = 0,
                 llm_from_source: dict | None = None, **kwargs: Any):
        self.vision = vision or {}
        self.connector = connector or {"name": "mlp2x_gelu"}
        self.text_config_dict = text_config or {}
        self.llm_source = llm_source
        self.image_token_id = image_token_id
        self.position_gap = position_gap  # modality-gap positions (medvl.models.position_ids); 0 = plain
        self.llm_from_source = llm_from_source  # weights read from llm_source at load (medvl.models.source_weights)
        super().__init__(**kwargs)


class MedVLM(PreTrainedModel):
    config_class = MedVLMConfig
    base_model_prefix = "medvl_vlm"
    _no_split_modules: list = []

    def __init__(self, config: MedVLMConfig, llm: nn.Module | None = None):
        super().__init__(config)
        self.vision = build_tower(VisionConfig(**config.vision))
        if llm is None:
            if config.llm_source and not config.text_config_dict:
                llm = AutoModelForCausalLM.from_pretrained(config.llm_source)
            elif config.text_config_dict:
                tc = dict(config.text_config_dict)
                llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(tc.pop("model_type"), **tc))
            else:
                raise MedvlUserError("a VLM needs an LM: llm_source (hub id / path) or text_config")
        self.llm = llm
        if not config.text_config_dict:
            config.text_config_dict = self.llm.config.to_dict()
        hidden = self.llm.config.hidden_size
        ccfg = ConnectorConfig(**{**config.connector, "grid": list(self.vision.grid)})
        self.connector = build_connector(ccfg, self.vision.width, hidden)
        if config.image_token_id is None:
            raise MedvlUserError("image_token_id is not set (the id of the <image> token in the tokenizer)")

    # -- sizes ------------------------------------------------------------------------------
    @property
    def tokens_per_image(self) -> int:
        return self.connector.num_tokens(self.vision.num_tokens())

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, T] modality-gap positions when ``config.position_gap`` > 0, else None (the LM's default)."""
        if not getattr(self.config, "position_gap", 0):
            return None
        return gap_position_ids(input_ids, self.config.image_token_id, self.tokens_per_image,
                                self.config.position_gap, attention_mask)

    # -- the four steps ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              vision_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``vision_tokens`` ([n_img, N, Dv], the tower's output) may replace ``pixel_values``
        when the caller has them cached (several questions about one image)."""
        text = self.llm.get_input_embeddings()(input_ids)  # [B, T, D]
        mask = input_ids == self.config.image_token_id  # [B, T]
        n_slots = int(mask.sum())
        n_img = vision_tokens.shape[0] if vision_tokens is not None else (0 if pixel_values is None else pixel_values.shape[0])
        if n_slots != n_img * self.tokens_per_image:
            raise MedvlUserError(f"{n_slots} image-token positions in the batch but {n_img} image(s) x "
                                 f"{self.tokens_per_image} tokens each = {n_img * self.tokens_per_image}: the "
                                 "<image> placeholders do not match the images")
        if n_img == 0:
            return text
        if vision_tokens is None:
            vision_tokens = self.vision(pixel_values.to(self.device, self.dtype))  # [n_img, N, Dv]
        feats = self.connector(vision_tokens.to(self.device, self.dtype))  # [n_img, M, D]
        return text.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(text.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values=None, inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        if "position_ids" not in kwargs and past_key_values is None and input_ids is not None:
            kwargs["position_ids"] = self.position_ids(input_ids, attention_mask)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                        past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, vision_tokens: torch.Tensor | None = None,
                 **gen_kwargs: Any) -> torch.Tensor:
        """New tokens only ([B, new]); prompts left-padded; KV cache on unless disabled.

        Plain greedy decoding with the cache (the evaluation case) runs :func:`greedy_decode`,
        a lean loop that gives the same tokens as ``transformers``' ``generate`` (tested) with
        less per-step overhead; sampling, beams, stop strings or ``use_cache=False`` go through
        ``generate``. ``position_ids`` ([B, T], e.g. modality-gap positions) are honoured by
        the lean loop, which continues them one by one during cached decoding.
        """
        embeds = self.embed(input_ids, pixel_values, vision_tokens)
        position_ids = gen_kwargs.pop("position_ids", None)
        guard = gen_kwargs.pop("utf8_guard", None)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, attention_mask)
        lean = {"max_new_tokens", "eos_token_id", "pad_token_id", "do_sample", "num_beams", "use_cache",
                "temperature", "top_p"}
        if set(gen_kwargs) <= lean and gen_kwargs.get("num_beams", 1) == 1 and gen_kwargs.get("use_cache", True):
            return greedy_decode(self.llm, embeds, attention_mask, gen_kwargs.get("max_new_tokens", 20),
                                 gen_kwargs.get("eos_token_id"), gen_kwargs.get("pad_token_id"), position_ids,
                                 do_sample=gen_kwargs.get("do_sample", False),
                                 temperature=gen_kwargs.get("temperature", 1.0), top_p=gen_kwargs.get("top_p", 1.0),
                                 utf8_guard=guard)
        if guard is not None:
            gen_kwargs["logits_processor"] = [*gen_kwargs.get("logits_processor", []), guard.logits_processor()]
        if position_ids is not None:
            raise MedvlUserError("modality-gap / custom position ids work with greedy or sampled cached decoding, "
                                 "not with beams, stop strings or use_cache=False")
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **gen_kwargs)

    # -- checkpoints -------------------------------------------------------------------------
    def save_vlm(self, out: str | Path, dtype: torch.dtype | None = None, delta_bits: int = 0,
                 delta_group: int = 64) -> Path:
        """config.json + model.safetensors (floating tensors cast to ``dtype`` when given); with
        ``config.llm_from_source`` set, without the rows its LM source provides at load time; with
        ``delta_bits`` (2, 4 or 8), the LM's block matrices as coded deltas against the source's
        (lossy: :mod:`medvl.models.source_weights`)."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        config = copy.deepcopy(self.config)
        spec = dict(self.config.llm_from_source or {})
        spec.pop("deltas", None)  # the model in memory holds its decoded weights
        if delta_bits:
            spec["deltas"] = delta_spec(self, delta_bits, delta_group)
        config.llm_from_source = spec or None
        if spec:
            state = split_state(state, spec, self.config.llm_source)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_file(state, str(out / "model.safetensors"))
        (out / "config.json").write_text(config.to_json_string())
        return out


@torch.no_grad()
def greedy_decode(llm, embeds: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                  eos_token_id: int | list | None, pad_token_id: int | None,
                  position_ids: torch.Tensor | None = None, *, do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, return_logprobs: bool = False, on_token=None, utf8_guard=None):
    """Greedy (or sampled) decoding with a KV cache from prompt embeddings; returns new tokens [B, new]
    (and, with ``return_logprobs``, each chosen token's log-probability [B, new], 0 after EOS).

    Sampling draws from softmax(logits / temperature) restricted to the top-p nucleus, with
    torch's global generator (seed it for reproducible candidates). ``on_token(tokens [B])`` is
    called after every step (streaming); returning True from it stops decoding.

    Prompts are left-padded (``attention_mask`` [B, T]). Positions default to the count of
    real tokens before each one (what ``generate`` derives from the mask); given
    ``position_ids`` ([B, T]) continue from each row's last prompt position + 1. Only the
    last position's logits are computed (``logits_to_keep=1``). A row that produced EOS leaves
    the batch (its KV cache rows are dropped), so short answers do not pay for long ones; its
    remaining positions are ``pad_token_id``. The loop stops when every row has finished.
    ``utf8_guard`` (:class:`medvl.models.utf8.Utf8Guard`) allows only tokens that keep each row's
    text valid UTF-8 (no "\ufffd" in an answer).
    """
    from transformers import DynamicCache

    B, T = embeds.shape[:2]
    dev = embeds.device
    mask = attention_mask.to(dev) if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=dev)
    if position_ids is None:
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=dev)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    cache = DynamicCache()
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
              use_cache=True, logits_to_keep=1)
    pos = position_ids.max(dim=-1).values  # [B] last prompt position
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)  # [B, new]
    logps = torch.zeros(B, max_new_tokens, device=dev)
    alive = torch.arange(B, device=dev)  # rows still decoding; finished rows leave the batch and its cache
    steps = 0
    utf8 = torch.zeros(B, dtype=torch.long)  # [b] continuation bytes each row still owes
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # [b, V], b = rows alive
        if utf8_guard is not None:
            logits = utf8_guard.mask(logits, utf8)
        nxt = _sample(logits, temperature, top_p) if do_sample else logits.argmax(-1)  # [b]
        if utf8_guard is not None:
            utf8 = utf8_guard.advance(utf8, nxt)
        tokens[alive, step] = nxt
        if return_logprobs:
            logps[alive, step] = logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0]
        steps = step + 1
        if on_token is not None and on_token(tokens[:, step]):
            break
        fin = torch.isin(nxt, eos) if len(eos) else torch.zeros_like(nxt, dtype=torch.bool)
        if bool(fin.all()) or step == max_new_tokens - 1:
            break
        if bool(fin.any()):  # drop finished rows: later steps cost only what is still being written
            keep = (~fin).nonzero()[:, 0]
            out.past_key_values.batch_select_indices(keep)
            alive, nxt, pos, mask = alive[keep], nxt[keep], pos[keep], mask[keep]
            utf8 = utf8[keep.cpu()]
        pos = pos + 1
        mask = torch.cat([mask, torch.ones(len(alive), 1, dtype=mask.dtype, device=dev)], dim=1)
        out = llm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], past_key_values=out.past_key_values,
                  use_cache=True, logits_to_keep=1)
    tokens = tokens[:, :steps]
    if return_logprobs:
        return tokens, logps[:, :steps]
    return tokens


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / T), keeping the smallest set of tokens whose
    probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020)."""
    probs = (logits / max(temperature, 1e-5)).softmax(-1)  # [B, V]
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # tokens after the nucleus is full
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1)[:, 0]


def load_vlm(path: str | Path, *, allow_missing: bool = False) -> MedVLM:
    """Rebuild from config.json, load model.safetensors strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in ("config.json", "model.safetensors"):
        if not (path / f).exists():
            raise MedvlUserError(f"not a medvl VLM checkpoint: {f} is missing", path=path)
    cfg = MedVLMConfig(**{k: v for k, v in json.loads((path / "config.json").read_text()).items()
                          if k not in ("model_type", "transformers_version")})
    model = MedVLM(cfg)
    state = load_file(str(path / "model.safetensors"))
    if cfg.llm_from_source:
        from medvl.models.source_weights import join_state
        state = join_state(state, cfg.llm_from_source, cfg.llm_source, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if (missing or unexpected) and not allow_missing:
        raise MedvlUserError(f"checkpoint does not match the model: {len(missing)} missing key(s) "
                             f"{missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]} "
                             "(pass allow_missing=True to load anyway)", path=path)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model.eval()


def image_loader_for(model):
    """Media -> pixel tensor with the tower's preprocessing (medical I/O underneath); a Media whose
    ``array`` holds an already decoded MedicalImage (an upload to the server) is not read again."""
    from medvl.data.imageio import MedicalImage, load_medical
    from medvl.data.transforms import preprocess_2d

    size = getattr(model.vision, "image_size", 0) or 224
    volume = len(model.vision.grid) == 3
    shape = model.config.vision.get("volume_size", [32, 128, 128])
    window = model.config.vision.get("window")  # saved with the model: training and inference window alike

    def load(media) -> torch.Tensor:
        img = media.array if isinstance(media.array, MedicalImage) else load_medical(media.path)
        if volume:  # [1, D, H, W]; a 2D image is a one-slice volume
            from medvl.data.transforms import preprocess_3d
            if img.kind != "volume":
                raise MedvlUserError("this model's vision tower takes 3D volumes, got a 2D image", path=media.path)
            return torch.from_numpy(preprocess_3d(img, shape, window=window))
        return torch.from_numpy(preprocess_2d(img, size, mode="pad", window=window))  # [3, S, S]
    return load
