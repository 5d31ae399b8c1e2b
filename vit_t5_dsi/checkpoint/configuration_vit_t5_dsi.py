"""Configuration of the ViT + T5 generative image index (one config for all three variants)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig, T5Config, ViTConfig
from transformers.configuration_utils import SubConfigSpec

DUAL_ENCODER = "dual_encoder"  # the dense baseline: the one variant that embeds instead of writing identifiers
GENERATIVE_VARIANTS = ("cross_attention", "codebook")
VARIANTS = GENERATIVE_VARIANTS + (DUAL_ENCODER,)
# The pipeline task every checkpoint names in `config.custom_pipelines`, and the checkpoint file that implements it
RETRIEVAL_TASK = "text-to-image-retrieval"
PIPELINE_MODULE = "pipeline_text_to_image_retrieval"
TEXT_MODEL_TYPES = ("t5", "mt5")

# Named sizes. `tiny` is what tests and the built-in demo train on 2 CPU cores; `base` has the
# widths of ViT-B/16 and T5-base (the seed's pairing) for realistic speed and memory figures.
SIZE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "vision": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8),
        "text": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1024),
    },
    "small": {
        "vision": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                       image_size=64, patch_size=8),
        "text": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4, vocab_size=8192),
    },
    "base": {
        "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       image_size=224, patch_size=16),
        "text": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128),
    },
}


class ViTT5DSIConfig(PreTrainedConfig):
    r"""
    Configuration of a ViT + T5 model that indexes images by learning to write their identifiers.

    vision_config (`dict` or `PreTrainedConfig`, *optional*):
        The image tower: a `ViTConfig` by default, a `TimmWrapperConfig` (`{"model_type": "timm_wrapper",
        "architecture": "resnet18", "model_args": {...}}`) for a timm backbone, or any vision config that
        `AutoModel` builds.
    text_config (`dict` or `T5Config`, *optional*):
        The T5 encoder-decoder (or T5 encoder, for the dual encoder).
    variant (`str`, *optional*, defaults to `"cross_attention"`):
        `cross_attention`: the T5 decoder cross-attends to projected ViT states (image-grounded decoder).
        `codebook`: ViT patch states are snapped to rows of T5's input embeddings and read by T5's encoder.
        `dual_encoder`: pooled ViT and T5-encoder embeddings trained contrastively (the dense baseline).
    codebook_num_tokens (`int`, *optional*, defaults to 16):
        Number of visual tokens per image (patch states are average-pooled to this length).
    codebook_straight_through (`bool`, *optional*, defaults to `True`):
        Learn the projection with a straight-through estimator. `False` is the original gradient-free lookup.
    codebook_commitment_weight (`float`, *optional*, defaults to 0.01):
        Weight of the commitment loss that pulls projected patch states toward their codebook rows. T5's
        embeddings are not a learned VQ codebook, so this loss alone is minimised by mapping every patch to one
        row: VQ-VAE's 0.25 collapsed the demo's visual tokens to a single token (index Hits@1 0.003); 0.01 kept
        42 distinct tokens and reached 0.42.
    alignment_loss_weight (`float`, *optional*, defaults to 0.0):
        Weight of an optional contrastive image-text alignment loss for the generative variants, between
        pooled image states and pooled caption states of the same identifier in a mixed batch.
    projection_dim (`int`, *optional*):
        Embedding width of the dual encoder (defaults to T5's `d_model`).
    logit_scale_init_value (`float`, *optional*, defaults to 2.6592):
        Initial log temperature of the contrastive loss (CLIP's value, ln(1/0.07)).
    caption_token_id (`int`, *optional*):
        Generative variants: the token that starts a caption (the task signal at the decoder's start, like BLIP's
        decoder token). Set when the model learns captioning; identifiers start directly after the decoder start
        token, captions after this one, so one decoder writes both without mixing them.
    """

    model_type = "vit-t5-dsi"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="t5"),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    variant: str = "cross_attention"
    codebook_num_tokens: int = 16
    codebook_straight_through: bool = True
    codebook_commitment_weight: float = 0.01
    alignment_loss_weight: float = 0.0
    projection_dim: int | None = None
    logit_scale_init_value: float = 2.6592
    caption_token_id: int | None = None
    caption_suppress_token_ids: list[int] | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check()
        self.is_encoder_decoder = self.variant in GENERATIVE_VARIANTS
        # Generation reads these from the top-level config.
        self.pad_token_id = self.text_config.pad_token_id
        self.eos_token_id = self.text_config.eos_token_id
        if getattr(self.text_config, "decoder_start_token_id", None) is None:  # T5 starts decoding from pad
            self.text_config.decoder_start_token_id = self.text_config.pad_token_id
        self.decoder_start_token_id = self.text_config.decoder_start_token_id

    @property
    def is_generative(self) -> bool:
        """Writes identifiers under constrained beam search (cross_attention, codebook)."""
        return self.variant in GENERATIVE_VARIANTS

    @property
    def is_dual_encoder(self) -> bool:
        """Embeds captions and images and ranks by cosine (the dense baseline)."""
        return self.variant == DUAL_ENCODER

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads this variant."""
        return "AutoModel" if self.is_dual_encoder else "AutoModelForSeq2SeqLM"

    def custom_pipelines_entry(self) -> dict:
        """What `config.custom_pipelines` records so that `pipeline(RETRIEVAL_TASK, model=CKPT,
        trust_remote_code=True)` finds the pipeline file the checkpoint carries (how transformers saves one)."""
        return {RETRIEVAL_TASK: {"impl": f"{PIPELINE_MODULE}.TextToImageRetrievalPipeline",
                                 "pt": [self.auto_class], "type": "multimodal"}}

    def _check(self) -> None:
        """Fail at construction, naming the field, rather than deep inside a forward pass."""
        if self.variant not in VARIANTS:
            raise ValueError(f"ViTT5DSIConfig.variant={self.variant!r} is not one of {', '.join(VARIANTS)}.")
        if self.text_config.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"ViTT5DSIConfig.text_config must be a T5 config (model_type in {TEXT_MODEL_TYPES}), "
                f"got model_type={self.text_config.model_type!r}."
            )
        if self.vision_config.model_type in TEXT_MODEL_TYPES:
            raise ValueError("ViTT5DSIConfig.vision_config is a text config; pass a ViT or timm config.")
        if self.codebook_num_tokens < 1:
            raise ValueError(f"ViTT5DSIConfig.codebook_num_tokens must be >= 1, got {self.codebook_num_tokens}.")
        if self.codebook_commitment_weight < 0:
            raise ValueError(
                f"ViTT5DSIConfig.codebook_commitment_weight must be >= 0, got {self.codebook_commitment_weight}."
            )
        if self.alignment_loss_weight < 0:
            raise ValueError(f"ViTT5DSIConfig.alignment_loss_weight must be >= 0, got {self.alignment_loss_weight}.")
        if self.variant == "dual_encoder" and self.alignment_loss_weight > 0:
            raise ValueError(
                "ViTT5DSIConfig.alignment_loss_weight applies to the generative variants only: the dual_encoder "
                "variant's whole loss is already the contrastive alignment."
            )
        if self.variant != "codebook" and not self.codebook_straight_through:
            raise ValueError(
                "ViTT5DSIConfig.codebook_straight_through=False only makes sense with variant='codebook', "
                f"got variant={self.variant!r}."
            )
        if self.caption_token_id is not None and self.variant not in GENERATIVE_VARIANTS:
            raise ValueError("ViTT5DSIConfig.caption_token_id needs a generative variant (the dual encoder has no "
                             "decoder to write captions).")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"ViTT5DSIConfig.projection_dim must be >= 1, got {self.projection_dim}.")

    @classmethod
    def from_preset(cls, size: str = "tiny", variant: str = "cross_attention", vocab_size: int | None = None,
                    **kwargs) -> "ViTT5DSIConfig":
        """A from-scratch config of a named size (`tiny`, `small`, `base`)."""
        if size not in SIZE_PRESETS:
            raise ValueError(f"model_size={size!r} is not one of {', '.join(SIZE_PRESETS)}.")
        preset = SIZE_PRESETS[size]
        text = dict(preset["text"])
        if vocab_size is not None:
            text["vocab_size"] = vocab_size
        return cls(vision_config=ViTConfig(**preset["vision"]), text_config=T5Config(**text), variant=variant,
                   **kwargs)

    @property
    def image_size(self) -> int:
        """Square input resolution of the image tower."""
        size = getattr(self.vision_config, "image_size", None)
        if size is None:  # timm: read from its pretrained_cfg / model_args when given
            args = getattr(self.vision_config, "model_args", None) or {}
            size = args.get("img_size", 224)
        return int(size[0] if isinstance(size, (list, tuple)) else size)


__all__ = ["ViTT5DSIConfig", "VARIANTS", "GENERATIVE_VARIANTS", "DUAL_ENCODER", "SIZE_PRESETS", "RETRIEVAL_TASK",
           "PIPELINE_MODULE"]
