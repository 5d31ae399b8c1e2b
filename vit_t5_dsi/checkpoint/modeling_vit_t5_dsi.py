"""ViT + T5 models that index images by writing their identifiers, and the dual-encoder baseline.

One base class (`ViTT5DSIPreTrainedModel`) owns the image tower, weight init, composition from separately
pretrained parts and saving the image index beside the weights. The two generative variants share one class;
the only place where they differ is `_image_encoder_states`.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (GenerationMixin, PreTrainedModel, T5EncoderModel, T5ForConditionalGeneration,
                          TimmWrapperModel, ViTModel)
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .checkpoint_io import copy_checkpoint_code, save_directory_atomically
from .configuration_vit_t5_dsi import GENERATIVE_VARIANTS, ViTT5DSIConfig
from .image_index import ImageIndex
from .modeling_blocks import (DualEncoderOutput, GenerativeOutput, build_vision_tower, load_pretrained_vision_tower,
                              masked_mean, multi_positive_nce, normalised_mean_output, pad_and_stack,
                              vision_tower_width)

logger = logging.getLogger(__name__)

CAPTION_TOKEN = "<caption>"
# CLIP's bounds: the learned logit scale may not exceed 100 (beyond it the contrastive loss destabilises), and the
# optional alignment loss of the generative variants uses CLIP's initial temperature, fixed
MAX_LOGIT_SCALE = math.log(100.0)
ALIGNMENT_TEMPERATURE = 0.07


class ViTT5DSIPreTrainedModel(PreTrainedModel):
    config_class = ViTT5DSIConfig
    config: ViTT5DSIConfig
    base_model_prefix = "vit_t5_dsi"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    # The loss is a per-process mean; Trainer must not rescale it by the number of processes (DDP).
    accepts_loss_kwargs = False
    _text_model_class: type[PreTrainedModel] = T5ForConditionalGeneration
    _text_model_attribute = "language_model"

    def __init__(self, config: ViTT5DSIConfig, vision_model: PreTrainedModel | None = None,
                 text_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else build_vision_tower(config.vision_config)
        text_model = text_model if text_model is not None else self._text_model_class(config.text_config)
        setattr(self, self._text_model_attribute, text_model)
        self.image_index: ImageIndex | None = None

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models (ViT, T5, timm) initialise themselves; this covers the layers this class adds.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ----- image tower -----------------------------------------------------------------------------
    def vision_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, S, D_vision) token states of the image tower, whatever its kind (ViT tokens, CNN grid)."""
        if isinstance(self.vision_model, TimmWrapperModel):
            states = self.vision_model(pixel_values, do_pooling=False).last_hidden_state
        else:
            states = self.vision_model(pixel_values=pixel_values.to(self.vision_model.dtype)).last_hidden_state
        if states.dim() == 4:  # a convolutional feature map (B, C, H, W)
            states = states.flatten(2).transpose(1, 2)
        return states

    # ----- composition and persistence -------------------------------------------------------------
    @classmethod
    def from_vision_text_pretrained(cls, vision_model_name_or_path: str, text_model_name_or_path: str,
                                    **config_kwargs) -> "ViTT5DSIPreTrainedModel":
        """Compose a model from a pretrained image tower (ViT checkpoint or timm name) and a pretrained T5."""
        vision = load_pretrained_vision_tower(vision_model_name_or_path)
        text = cls._text_model_class.from_pretrained(text_model_name_or_path)
        config = ViTT5DSIConfig(vision_config=vision.config, text_config=text.config, **config_kwargs)
        if config.variant in GENERATIVE_VARIANTS and cls._text_model_class is not T5ForConditionalGeneration:
            raise ValueError(f"variant={config.variant!r} needs ViTT5DSIForConditionalGeneration.")
        if config.is_dual_encoder and cls is not ViTT5DSIDualEncoderModel:
            raise ValueError("variant='dual_encoder' needs ViTT5DSIDualEncoderModel.")
        return cls(config, vision_model=vision, text_model=text)

    def save_pretrained(self, save_directory, is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
        """Weights, config and code (transformers; the `text-to-image-retrieval` pipeline included), plus what the
        model searches over: the image index and, for the dual encoder, the indexed images' embeddings. With
        `push_to_hub=True` all of it is uploaded."""
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private")
               if key in kwargs}
        timestamps = self._get_files_timestamps(save_directory) if push_to_hub and os.path.isdir(save_directory) else {}
        # `pipeline("text-to-image-retrieval", model=save_directory, trust_remote_code=True)` finds its code here
        self.config.custom_pipelines = self.config.custom_pipelines_entry()
        if not is_main_process:
            super().save_pretrained(save_directory, is_main_process=False, **kwargs)
            return
        save_weights_and_config = super().save_pretrained

        def write(folder: str) -> None:
            save_weights_and_config(folder, **kwargs)
            copy_checkpoint_code(folder)  # the pipeline and every module it needs, not only the model's imports
            if self.image_index is not None:
                self.image_index.save(folder)

        # written into a folder of its own first: a full disk leaves the previous save loadable (DiskFullError
        # names the folder), and every file gets ordinary permissions (safetensors writes model.safetensors 0600)
        save_directory_atomically(save_directory, write)
        if push_to_hub:  # uploaded here, after the index is written, so the pushed repo is complete
            from transformers.utils.hub import hf_api

            token = kwargs.get("token")
            repo_id = hf_api().create_repo(hub.get("repo_id", os.path.basename(os.path.abspath(save_directory))),
                                           exist_ok=True, private=hub.get("private"), token=token).repo_id
            self._upload_modified_files(save_directory, repo_id, timestamps, commit_message=hub.get("commit_message"),
                                        token=token, create_pr=hub.get("create_pr", False))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Weights and config as transformers loads them, and the image index saved beside them (with the same
        `revision`, `token`, `cache_dir`, `subfolder`); a checkpoint without an index loads with `image_index=None`."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
        model.image_index = ImageIndex.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if model.image_index is not None:
            model.image_index.check_vocabulary(model.get_input_embeddings().num_embeddings)
        return loaded

    def get_input_embeddings(self):
        return getattr(self, self._text_model_attribute).get_input_embeddings()

    def set_input_embeddings(self, value):
        getattr(self, self._text_model_attribute).set_input_embeddings(value)


class ViTT5DSIForConditionalGeneration(ViTT5DSIPreTrainedModel, GenerationMixin):
    """Writes image identifiers from images (indexing) or captions (retrieval) with one T5 decoder.

    `forward` takes `pixel_values`, `input_ids`/`attention_mask`, or both: a mixed batch whose rows are the
    images first, then the captions, with `labels` in that order (DSI's co-training of indexing and retrieval).
    """

    _keys_to_ignore_on_load_unexpected = [r"language_model\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative"]

    def __init__(self, config: ViTT5DSIConfig, vision_model=None, text_model=None):
        if config.variant not in GENERATIVE_VARIANTS:
            raise ValueError(f"ViTT5DSIForConditionalGeneration needs a generative variant, got {config.variant!r}; "
                             "use ViTT5DSIDualEncoderModel for 'dual_encoder'.")
        super().__init__(config, vision_model, text_model)
        width, d_model = vision_tower_width(self.vision_model), config.text_config.d_model
        learn_codebook_projection = config.variant == "codebook" and config.codebook_straight_through
        if width != d_model or learn_codebook_projection:
            self.visual_projection = nn.Linear(width, d_model)
        else:
            self.visual_projection = nn.Identity()
        self.post_init()

    def get_encoder(self):
        return self.language_model.get_encoder()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def resize_token_embeddings(self, *args, **kwargs):
        embeddings = self.language_model.resize_token_embeddings(*args, **kwargs)
        self.config.text_config.vocab_size = embeddings.num_embeddings
        return embeddings

    # ----- the one place where the generative variants differ --------------------------------------
    def _image_encoder_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States the T5 decoder cross-attends to for a batch of images, and an auxiliary loss."""
        states = self.vision_states(pixel_values)
        if self.config.variant == "cross_attention":
            return self.visual_projection(states), None
        return self._codebook_encoder_states(states)

    def visual_tokens(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook variant: pooled, projected patch states (B, n, d_model) and their visual token ids (B, n)."""
        if isinstance(self.vision_model, ViTModel):
            states = states[:, 1:]  # patch tokens only, not [CLS]
        pooled = F.adaptive_avg_pool1d(states.transpose(1, 2), self.config.codebook_num_tokens).transpose(1, 2)
        codebook = self.get_input_embeddings().weight
        with torch.set_grad_enabled(self.config.codebook_straight_through and torch.is_grad_enabled()):
            projected = self.visual_projection(pooled).to(codebook.dtype)
        with torch.no_grad():
            # Nearest row by cosine, not Euclidean distance: while the projection's outputs are small (as at
            # initialisation), the Euclidean nearest row is the smallest-norm embedding for every slot of every
            # image, and the commitment loss then keeps the codebook collapsed onto that one token.
            token_ids = (F.normalize(projected, dim=-1) @ F.normalize(codebook, dim=-1).T).argmax(-1)
        return projected, token_ids

    def _codebook_encoder_states(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Snap projected patch states to T5's input embeddings (visual tokens) and read them with T5's encoder."""
        projected, token_ids = self.visual_tokens(states)
        if not self.config.codebook_straight_through:  # the seed's gradient-free lookup: plain token ids
            return self.language_model.encoder(input_ids=token_ids).last_hidden_state, None
        quantized = self.get_input_embeddings().weight[token_ids].detach()
        visual_tokens = projected + (quantized - projected).detach()  # straight-through estimator
        commitment = self.config.codebook_commitment_weight * F.mse_loss(projected, quantized)
        return self.language_model.encoder(inputs_embeds=visual_tokens).last_hidden_state, commitment

    # ----- encoding, forward, generate -------------------------------------------------------------
    def encode(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None):
        """Encoder states for images, captions or a mixed batch: (BaseModelOutput, attention mask, aux loss)."""
        if pixel_values is None and input_ids is None:
            raise ValueError("Pass pixel_values (images), input_ids (captions), or both.")
        parts, aux_loss = [], None
        if pixel_values is not None:
            image_states, aux_loss = self._image_encoder_states(pixel_values)
            image_mask = torch.ones(image_states.shape[:2], dtype=torch.long, device=image_states.device)
            parts.append((image_states, image_mask))
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = (input_ids != self.config.pad_token_id).long()
            text_states = self.language_model.encoder(input_ids=input_ids, attention_mask=attention_mask)
            parts.append((text_states.last_hidden_state, attention_mask))
        if len(parts) == 1:
            states, mask = parts[0]
        else:
            (image_states, image_mask), (text_states, text_mask) = parts
            if self.config.alignment_loss_weight > 0 and labels is not None:
                alignment = self._alignment_loss(image_states, image_mask, text_states, text_mask, labels)
                aux_loss = alignment if aux_loss is None else aux_loss + alignment
            states, mask = pad_and_stack(image_states, image_mask, text_states, text_mask)
        return BaseModelOutput(last_hidden_state=states), mask, aux_loss

    # ----- embeddings under CLIP's names ----------------------------------------------------------
    def get_text_features(self, input_ids, attention_mask=None, **kwargs) -> BaseModelOutputWithPooling:
        """Caption embeddings, as CLIP's `get_text_features` returns them: `last_hidden_state` the T5-encoder states
        the decoder reads, `pooler_output` their L2-normalised masked mean (B, d_model), the space of the optional
        alignment loss (comparable with images only when `alignment_loss_weight > 0`)."""
        encoded, mask, _ = self.encode(input_ids=input_ids, attention_mask=attention_mask)
        return normalised_mean_output(encoded.last_hidden_state, mask)

    def get_image_features(self, pixel_values, **kwargs) -> BaseModelOutputWithPooling:
        """Image embeddings like `get_text_features`: the states the decoder reads for an image (projected tower
        states, or the codebook's T5-encoded visual tokens) and their L2-normalised mean."""
        encoded, mask, _ = self.encode(pixel_values=pixel_values)
        return normalised_mean_output(encoded.last_hidden_state, mask)

    def _alignment_loss(self, image_states, image_mask, text_states, text_mask, labels):
        """Contrastive loss pulling each caption toward the image of the same identifier in the batch."""
        num_images = image_states.shape[0]
        image_labels, text_labels = labels[:num_images], labels[num_images:]
        matches = (text_labels[:, None, :] == image_labels[None, :, :]).all(-1)  # (texts, images)
        has_match = matches.any(1)
        if not has_match.any():
            return image_states.new_zeros(())
        images = F.normalize(masked_mean(image_states, image_mask), dim=-1)
        texts = F.normalize(masked_mean(text_states, text_mask), dim=-1)
        logits = texts[has_match] @ images.T / ALIGNMENT_TEMPERATURE
        return self.config.alignment_loss_weight * F.cross_entropy(logits, matches[has_match].float().argmax(1))

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, encoder_outputs=None, labels=None, cache=None, use_cache=None,
                **kwargs) -> GenerativeOutput:
        aux_loss = None
        if encoder_outputs is None:
            encoder_outputs, attention_mask, aux_loss = self.encode(pixel_values, input_ids, attention_mask, labels)
        kwargs.pop("num_items_in_batch", None)
        outputs = self.language_model(encoder_outputs=encoder_outputs, attention_mask=attention_mask,
                                      decoder_input_ids=decoder_input_ids,
                                      decoder_attention_mask=decoder_attention_mask, labels=labels, cache=cache,
                                      use_cache=use_cache, **kwargs)
        if aux_loss is not None and outputs.loss is not None:
            outputs.loss = outputs.loss + aux_loss
        return GenerativeOutput(**outputs)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, encoder_outputs=None, **kwargs):
        """Generate identifiers from images or captions; the encoder runs once, before the search."""
        if encoder_outputs is None:
            encoder_outputs, attention_mask, _ = self.encode(pixel_values, input_ids, attention_mask)
        else:  # generate() expands encoder_outputs in place for the beams: never hand it the caller's object
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state)
        if attention_mask is None:
            attention_mask = torch.ones(encoder_outputs.last_hidden_state.shape[:2], dtype=torch.long,
                                        device=encoder_outputs.last_hidden_state.device)
        return super().generate(encoder_outputs=encoder_outputs, attention_mask=attention_mask, **kwargs)

    # ----- captioning (the seed's first step) -------------------------------------------------------
    def enable_captioning(self, tokenizer) -> int:
        """Give the decoder a caption task token (added to `tokenizer` if missing; embeddings resized) and return
        its id. Caption labels start with it; identifier labels never contain it, and the identifier trie never
        allows it."""
        if CAPTION_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [CAPTION_TOKEN]})
        token_id = tokenizer.convert_tokens_to_ids(CAPTION_TOKEN)
        if self.get_input_embeddings().num_embeddings <= token_id:
            self.resize_token_embeddings(token_id + 1)
        self.config.caption_token_id = token_id
        return token_id

    @torch.no_grad()
    def caption(self, pixel_values: torch.Tensor, max_new_tokens: int = 32, suppress_token_ids=(),
                **generate_kwargs) -> torch.Tensor:
        """Caption token ids (B * num_return_sequences, L) for a batch of images, without the task prefix.

        Decoding starts from (decoder start, caption token), so the decoder is in caption mode from its first
        step; `config.caption_suppress_token_ids` (identifier-only tokens) and `suppress_token_ids` are never
        written. Pass `do_sample`,
        `top_k`, `num_return_sequences`... for sampled pseudo-queries, `num_beams` for one careful caption.
        """
        if self.config.caption_token_id is None:
            raise ValueError("This model was not trained to caption (config.caption_token_id is None).")
        batch = pixel_values.shape[0]
        prefix = torch.tensor([[self.config.decoder_start_token_id, self.config.caption_token_id]],
                              device=pixel_values.device).repeat(batch, 1)
        suppress = sorted({int(t) for t in suppress_token_ids} | set(self.config.caption_suppress_token_ids or ())
                          | {self.config.caption_token_id})
        out = self.generate(pixel_values=pixel_values, decoder_input_ids=prefix, max_new_tokens=max_new_tokens,
                            suppress_tokens=suppress, **generate_kwargs)
        return out[:, prefix.shape[1]:]


class ViTT5DSIDualEncoderModel(ViTT5DSIPreTrainedModel):
    """The dense baseline: pooled ViT and T5-encoder embeddings, CLIP-style symmetric contrastive loss."""

    main_input_name = "input_ids"
    _text_model_class = T5EncoderModel
    _text_model_attribute = "text_model"

    def __init__(self, config: ViTT5DSIConfig, vision_model=None, text_model=None):
        if not config.is_dual_encoder:
            raise ValueError(f"ViTT5DSIDualEncoderModel needs variant='dual_encoder', got {config.variant!r}.")
        super().__init__(config, vision_model, text_model)
        dim = config.projection_dim or config.text_config.d_model
        self.visual_projection = nn.Linear(vision_tower_width(self.vision_model), dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.d_model, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            self.logit_scale.fill_(self.config.logit_scale_init_value)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """CLIP's name: the tower's token states and `pooler_output`, the L2-normalised embedding (B, projection_dim)
        the index searches with (the mean of the token states, projected)."""
        states = self.vision_states(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=states,
                                          pooler_output=F.normalize(self.visual_projection(states.mean(1)), dim=-1))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          **kwargs) -> BaseModelOutputWithPooling:
        """CLIP's name: the T5-encoder states and `pooler_output`, the L2-normalised caption embedding
        (B, projection_dim) compared with the indexed images (the masked mean of the states, projected)."""
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        states = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=F.normalize(
            self.text_projection(masked_mean(states, attention_mask)), dim=-1))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, projection_dim): `get_image_features(...).pooler_output`."""
        return self.get_image_features(pixel_values).pooler_output

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised caption embeddings (B, projection_dim): `get_text_features(...).pooler_output`."""
        return self.get_text_features(input_ids, attention_mask).pooler_output

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                **kwargs) -> DualEncoderOutput:
        """Pairs (image i, caption i). `labels` (B,) are image indices: rows sharing one are all positives,
        so several captions of one image in a batch are not pushed apart."""
        image_embeds = self.encode_images(pixel_values) if pixel_values is not None else None
        text_embeds = self.encode_texts(input_ids, attention_mask) if input_ids is not None else None
        loss = logits = None
        if image_embeds is not None and text_embeds is not None:
            logits = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * text_embeds @ image_embeds.T
            if labels is None:
                labels = torch.arange(logits.shape[0], device=logits.device)
            positives = labels[:, None] == labels[None, :]
            loss = (multi_positive_nce(logits, positives) + multi_positive_nce(logits.T, positives.T)) / 2
        return DualEncoderOutput(loss=loss, logits_per_text=logits, text_embeds=text_embeds,
                                 image_embeds=image_embeds)


ViTT5DSIConfig.register_for_auto_class()
ViTT5DSIForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")
ViTT5DSIDualEncoderModel.register_for_auto_class("AutoModel")

__all__ = [
    "ViTT5DSIPreTrainedModel",
    "ViTT5DSIForConditionalGeneration",
    "ViTT5DSIDualEncoderModel",
]
