import os
import subprocess
import sys

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration, ViTConfig, ViTModel

from conftest import tiny_config
from vit_t5_dsi.identifiers.build import build_image_index
from vit_t5_dsi import ViTT5DSIConfig, ViTT5DSIDualEncoderModel, ViTT5DSIForConditionalGeneration
from vit_t5_dsi.checkpoint.image_index import ImageIndex

GENERATIVE = ["cross_attention", "codebook"]


def make_batch(tokenizer, images=2, captions=2):
    pixel_values = torch.randn(images, 3, 32, 32) if images else None
    text = tokenizer(["a red circle", "two blue squares at the top"][:captions], padding=True,
                     return_tensors="pt") if captions else None
    labels = torch.tensor([[4, 5, 1], [6, 1, -100], [7, 8, 1], [4, 4, 1]])[: images + captions]
    return pixel_values, text, labels


# ----- config errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(variant="bogus"), "variant"),
    (dict(codebook_num_tokens=0), "codebook_num_tokens"),
    (dict(codebook_commitment_weight=-1.0), "codebook_commitment_weight"),
    (dict(alignment_loss_weight=-0.5), "alignment_loss_weight"),
    (dict(variant="dual_encoder", alignment_loss_weight=0.5), "alignment_loss_weight"),
    (dict(variant="cross_attention", codebook_straight_through=False), "codebook_straight_through"),
    (dict(projection_dim=0), "projection_dim"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kwargs)


def test_config_rejects_non_t5_text_and_unknown_size():
    with pytest.raises(ValueError, match="text_config"):
        ViTT5DSIConfig(text_config={"model_type": "bert"})
    with pytest.raises(ValueError, match="model_size"):
        ViTT5DSIConfig.from_preset("huge")


def test_model_class_rejects_wrong_variant():
    with pytest.raises(ValueError, match="dual_encoder"):
        ViTT5DSIForConditionalGeneration(tiny_config("dual_encoder"))
    with pytest.raises(ValueError, match="dual_encoder"):
        ViTT5DSIDualEncoderModel(tiny_config("codebook"))


def test_presets_have_the_promised_widths():
    base = ViTT5DSIConfig.from_preset("base")
    assert (base.vision_config.hidden_size, base.vision_config.patch_size, base.text_config.d_model) == (768, 16, 768)
    tiny = ViTT5DSIConfig.from_preset("tiny")
    assert tiny.vision_config.hidden_size <= 128 and tiny.image_size <= 64


# ----- forward / backward -------------------------------------------------------------------------

@pytest.mark.parametrize("variant", GENERATIVE)
@pytest.mark.parametrize("kind", ["images", "captions", "mixed"])
def test_forward_backward(tokenizer, variant, kind):
    model = ViTT5DSIForConditionalGeneration(tiny_config(variant))
    pixel_values, text, labels = make_batch(tokenizer, images=0 if kind == "captions" else 2,
                                            captions=0 if kind == "images" else 2)
    out = model(pixel_values=pixel_values, input_ids=text.input_ids if text else None,
                attention_mask=text.attention_mask if text else None, labels=labels)
    assert out.logits.shape[:2] == labels.shape and torch.isfinite(out.loss)
    out.loss.backward()
    embeddings = model.get_input_embeddings().weight.grad
    assert embeddings is not None and embeddings.abs().sum() > 0
    if kind != "captions":
        vision_grad = sum(p.grad.abs().sum() for p in model.vision_model.parameters() if p.grad is not None)
        assert vision_grad > 0, "no gradient reached the image tower"


def test_loss_is_not_rescaled_by_trainer_under_ddp():
    """Trainer multiplies the loss by the process count for models that take loss kwargs; ours must opt out."""
    assert ViTT5DSIForConditionalGeneration.accepts_loss_kwargs is False
    assert ViTT5DSIDualEncoderModel.accepts_loss_kwargs is False


def test_mixed_batch_equals_separate_batches(tokenizer):
    """Rows of a mixed batch are padded, not mixed: each row's logits match its single-modality run."""
    model = ViTT5DSIForConditionalGeneration(tiny_config()).eval()
    pixel_values, text, labels = make_batch(tokenizer)
    mixed = model(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask,
                  labels=labels).logits
    images = model(pixel_values=pixel_values, labels=labels[:2]).logits
    captions = model(input_ids=text.input_ids, attention_mask=text.attention_mask, labels=labels[2:]).logits
    torch.testing.assert_close(mixed, torch.cat([images, captions]), atol=1e-5, rtol=1e-4)


def test_codebook_straight_through_trains_projection_and_frozen_does_not(tokenizer):
    model = ViTT5DSIForConditionalGeneration(tiny_config("codebook"))
    pixel_values, _, labels = make_batch(tokenizer, captions=0)
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert model.visual_projection.weight.grad.abs().sum() > 0

    frozen = ViTT5DSIForConditionalGeneration(tiny_config("codebook", codebook_straight_through=False))
    frozen(pixel_values=pixel_values, labels=labels).loss.backward()
    assert all(p.grad is None for p in frozen.vision_model.parameters())


@pytest.mark.parametrize("straight_through", [True, False])
def test_codebook_visual_tokens_differ_between_images(straight_through):
    """Guards against codebook collapse: a fresh model must not snap every image to the same visual tokens."""
    model = ViTT5DSIForConditionalGeneration(tiny_config("codebook", codebook_straight_through=straight_through))
    tokens = []
    with torch.no_grad():
        for seed in range(8):
            torch.manual_seed(seed)
            _, token_ids = model.visual_tokens(model.vision_states(torch.randn(1, 3, 32, 32)))
            tokens.append(tuple(token_ids.flatten().tolist()))
    assert len(set(tokens)) == 8
    assert len({t for sequence in tokens for t in sequence}) > 8


def test_alignment_loss_adds_a_term(tokenizer):
    pixel_values, text, _ = make_batch(tokenizer)
    labels = torch.tensor([[4, 1], [5, 1], [4, 1], [6, 1]])  # caption 0 matches image 0
    inputs = dict(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask,
                  labels=labels)
    torch.manual_seed(0)
    plain = ViTT5DSIForConditionalGeneration(tiny_config()).eval()
    torch.manual_seed(0)
    aligned = ViTT5DSIForConditionalGeneration(tiny_config(alignment_loss_weight=1.0)).eval()
    assert aligned(**inputs).loss > plain(**inputs).loss


def test_dual_encoder_forward_backward_and_embeddings(tokenizer):
    model = ViTT5DSIDualEncoderModel(tiny_config("dual_encoder", projection_dim=24))
    pixel_values, text, _ = make_batch(tokenizer, captions=2)
    out = model(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask)
    out.loss.backward()
    assert out.image_embeds.shape == (2, 24) and model.logit_scale.grad is not None
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    assert model.visual_projection.weight.grad.abs().sum() > 0


def test_dual_encoder_labels_make_same_image_captions_positives(tokenizer):
    model = ViTT5DSIDualEncoderModel(tiny_config("dual_encoder"))
    pixel_values = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1)
    text = tokenizer(["a red circle", "a circle that is red"], padding=True, return_tensors="pt")
    same = model(pixel_values=pixel_values, input_ids=text.input_ids, labels=torch.tensor([0, 0])).loss
    assert torch.isclose(same, torch.tensor(0.0), atol=1e-6)  # both columns are the gold image: nothing to push


# ----- generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", GENERATIVE)
def test_generate_from_images_and_captions_runs_encoder_once(tokenizer, variant):
    model = ViTT5DSIForConditionalGeneration(tiny_config(variant)).eval()
    calls = {"vision": 0, "text": 0}
    model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    model.language_model.encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    pixel_values, text, _ = make_batch(tokenizer)
    out = model.generate(pixel_values=pixel_values, num_beams=3, num_return_sequences=3, max_new_tokens=4)
    assert out.shape[0] == 6 and calls["vision"] == 1
    text_calls_before = calls["text"]
    out = model.generate(input_ids=text.input_ids, attention_mask=text.attention_mask, num_beams=2, max_new_tokens=4)
    assert out.shape[0] == 2 and calls["text"] == text_calls_before + 1


def test_generate_with_encoder_outputs_does_not_grow_them(tokenizer):
    model = ViTT5DSIForConditionalGeneration(tiny_config()).eval()
    encoder_outputs, mask, _ = model.encode(pixel_values=torch.randn(2, 3, 32, 32))
    for _ in range(2):
        out = model.generate(encoder_outputs=encoder_outputs, attention_mask=mask, num_beams=4, max_new_tokens=3)
        assert out.shape[0] == 2
    assert encoder_outputs.last_hidden_state.shape[0] == 2


# ----- persistence --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", GENERATIVE + ["dual_encoder"])
def test_save_load_round_trip_identical_outputs(tmp_path, tokenizer, variant):
    cls = ViTT5DSIDualEncoderModel if variant == "dual_encoder" else ViTT5DSIForConditionalGeneration
    model = cls(tiny_config(variant)).eval()
    model.image_index = build_image_index([f"img{i}" for i in range(12)], tokenizer, "naive")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "image_index.json").exists()
    loaded = cls.from_pretrained(tmp_path).eval()
    pixel_values, text, labels = make_batch(tokenizer)
    with torch.no_grad():
        if variant == "dual_encoder":
            a = model(pixel_values=pixel_values, input_ids=text.input_ids).logits_per_text
            b = loaded(pixel_values=pixel_values, input_ids=text.input_ids).logits_per_text
        else:
            a = model(pixel_values=pixel_values, input_ids=text.input_ids, labels=labels).logits
            b = loaded(pixel_values=pixel_values, input_ids=text.input_ids, labels=labels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.image_index.keys == model.image_index.keys


AUTO_LOAD = """
import sys, torch
from transformers import AutoModel, AutoModelForSeq2SeqLM
path, auto = sys.argv[1], sys.argv[2]
cls = AutoModelForSeq2SeqLM if auto == "seq2seq" else AutoModel
model = cls.from_pretrained(path, trust_remote_code=True).eval()
expected = torch.load(path + "/expected.pt")
with torch.no_grad():
    if auto == "seq2seq":
        got = model(pixel_values=expected["pixel_values"], labels=expected["labels"]).logits
    else:
        got = model.encode_images(expected["pixel_values"])
assert "vit_t5_dsi" not in sys.modules, "loaded our installed package instead of the saved code"
torch.testing.assert_close(got, expected["out"], rtol=0, atol=0)
print("OK", type(model).__name__)
"""


@pytest.mark.parametrize("variant", ["cross_attention", "dual_encoder"])
def test_auto_class_loads_in_fresh_process(tmp_path, variant):
    cls = ViTT5DSIDualEncoderModel if variant == "dual_encoder" else ViTT5DSIForConditionalGeneration
    model = cls(tiny_config(variant)).eval()
    model.save_pretrained(tmp_path)
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([[4, 1], [5, 1]])
    with torch.no_grad():
        out = model.encode_images(pixel_values) if variant == "dual_encoder" else \
            model(pixel_values=pixel_values, labels=labels).logits
    torch.save({"pixel_values": pixel_values, "labels": labels, "out": out}, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(AUTO_LOAD)
    result = subprocess.run([sys.executable, str(script), str(tmp_path),
                             "auto" if variant == "dual_encoder" else "seq2seq"],
                            capture_output=True, text=True, cwd=tmp_path, env=os.environ.copy(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK ViTT5DSI" in result.stdout


def test_timm_backbone(tokenizer):
    config = ViTT5DSIConfig(
        vision_config={"model_type": "timm_wrapper", "architecture": "test_resnet", "model_args": {}},
        text_config=T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=160))
    model = ViTT5DSIForConditionalGeneration(config)
    out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([[4, 1], [5, 1]]))
    out.loss.backward()
    assert isinstance(model.visual_projection, torch.nn.Linear)
    assert any(p.grad is not None for p in model.vision_model.parameters())


def test_compose_from_separately_pretrained_parts(tmp_path):
    vit = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8))
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                             vocab_size=100))
    vit.save_pretrained(tmp_path / "vit")
    t5.save_pretrained(tmp_path / "t5")
    model = ViTT5DSIForConditionalGeneration.from_vision_text_pretrained(str(tmp_path / "vit"),
                                                                         str(tmp_path / "t5"))
    torch.testing.assert_close(model.vision_model.embeddings.patch_embeddings.projection.weight,
                               vit.embeddings.patch_embeddings.projection.weight)
    torch.testing.assert_close(model.language_model.shared.weight, t5.shared.weight)
    assert isinstance(model.visual_projection, torch.nn.Linear)  # 48 -> 32
    dual = ViTT5DSIDualEncoderModel.from_vision_text_pretrained(str(tmp_path / "vit"), str(tmp_path / "t5"),
                                                                variant="dual_encoder")
    torch.testing.assert_close(dual.text_model.shared.weight, t5.shared.weight)
    model(pixel_values=torch.randn(1, 3, 32, 32), labels=torch.tensor([[4, 1]])).loss.backward()


def test_compose_with_a_timm_name_offline(tmp_path, caplog):
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=100))
    t5.save_pretrained(tmp_path / "t5")
    with caplog.at_level("WARNING"):
        model = ViTT5DSIForConditionalGeneration.from_vision_text_pretrained("test_vit", str(tmp_path / "t5"))
    assert "random weights" in caplog.text  # offline: timm's weights cannot be fetched, and it says so
    assert model.config.vision_config.architecture == "test_vit"
    model(pixel_values=torch.randn(1, 3, 160, 160), labels=torch.tensor([[4, 1]])).loss.backward()


def test_caption_tokenizer_round_trip(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a large red circle 1 2 3"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded(text).input_ids[-1] == loaded.eos_token_id == 1 and loaded.pad_token_id == 0
    assert loaded("407", add_special_tokens=False).input_ids == [loaded.convert_tokens_to_ids(c) for c in "407"]
