"""vit-t5-dsi: generative text-to-image retrieval (a Differentiable Search Index over images)."""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .checkpoint.configuration_vit_t5_dsi import ViTT5DSIConfig
from .checkpoint.image_index import ImageIndex
from .checkpoint.processing_vit_t5_dsi import ViTT5DSIProcessor
from .checkpoint.pipeline_text_to_image_retrieval import TASK as RETRIEVAL_TASK, TextToImageRetrievalPipeline
from .identifiers.build import build_image_index
from .search.retriever import DSIRetriever
from .checkpoint.loading import load_dense_reranker, load_dsi_model, model_class_for_variant
from .checkpoint.modeling_vit_t5_dsi import (
    ViTT5DSIDualEncoderModel,
    ViTT5DSIForConditionalGeneration,
    ViTT5DSIPreTrainedModel,
)

# In-process Auto registration (checkpoints also carry `auto_map` for `trust_remote_code=True` elsewhere).
AutoConfig.register(ViTT5DSIConfig.model_type, ViTT5DSIConfig, exist_ok=True)
AutoModelForSeq2SeqLM.register(ViTT5DSIConfig, ViTT5DSIForConditionalGeneration, exist_ok=True)
AutoModel.register(ViTT5DSIConfig, ViTT5DSIDualEncoderModel, exist_ok=True)
AutoProcessor.register(ViTT5DSIConfig, ViTT5DSIProcessor, exist_ok=True)
# `pipeline("text-to-image-retrieval", model=loaded_model, processor=processor)` in-process; a checkpoint path also
# works without this package, through the copy of the pipeline file it carries (trust_remote_code=True)
PIPELINE_REGISTRY.register_pipeline(RETRIEVAL_TASK, pipeline_class=TextToImageRetrievalPipeline,
                                    pt_model=(AutoModelForSeq2SeqLM, AutoModel), type="multimodal")



def __getattr__(name: str):
    """`add_images` / `remove_images` are imported when first used: they bring the trainer, which searching with a
    checkpoint never needs."""
    if name in ("add_images", "remove_images"):
        import importlib

        return getattr(importlib.import_module(f".updates.{name}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["ViTT5DSIConfig", "ViTT5DSIForConditionalGeneration", "ViTT5DSIDualEncoderModel",
           "ViTT5DSIPreTrainedModel", "ViTT5DSIProcessor", "ImageIndex", "DSIRetriever",
           "TextToImageRetrievalPipeline", "RETRIEVAL_TASK", "load_dsi_model", "model_class_for_variant",
           "build_image_index", "load_dense_reranker", "add_images", "remove_images"]
