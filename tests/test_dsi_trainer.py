"""DSITrainer on its own: built from a model, a processor, the images and the query sets, nothing attached."""

import os

import pytest
import torch
from transformers import Seq2SeqTrainingArguments

from conftest import make_trainer, tiny_config
from vit_t5_dsi import ViTT5DSIProcessor, model_class_for_variant
from vit_t5_dsi.data.rows import ImageSource, evaluation_sets
from vit_t5_dsi.training.trainer import DSITrainer


@pytest.mark.parametrize("variant", ["cross_attention", "codebook", "dual_encoder"])
def test_evaluate_and_predict_work_without_anything_attached(tmp_path, splits, tokenizer, variant):
    trainer = make_trainer(tmp_path, splits, tokenizer, variant)
    metrics = trainer.evaluate()
    for prefix in ("eval", "seen", "index"):
        assert 0.0 <= metrics[f"{prefix}_hits@10"] <= 1.0
    assert metrics["eval_num_queries"] == len(splits.eval_queries)
    output = trainer.predict(evaluation_sets(splits)["eval"])
    assert output.predictions.shape == (len(splits.eval_queries), 10)
    assert ((output.predictions >= 0) & (output.predictions < len(splits.index))).all()
    assert output.metrics["test_hits@10"] == pytest.approx(metrics["eval_hits@10"])


def test_the_trainer_enforces_remove_unused_columns_false(tmp_path, splits, tokenizer):
    trainer = make_trainer(tmp_path, splits, tokenizer, "cross_attention", remove_unused_columns=True, max_steps=1)
    assert trainer.args.remove_unused_columns is False
    trainer.train()  # the collator still gets image_key / caption / kind


def test_reported_ks_follow_retrieval_k(tmp_path, splits, tokenizer):
    trainer = make_trainer(tmp_path, splits, tokenizer, "cross_attention")
    trainer.args.retrieval_k = 1
    one_beam = DSITrainer(model=trainer.model, args=trainer.args, images=trainer.images,
                          processing_class=trainer.processing_class, eval_dataset=trainer.eval_dataset)
    metrics = one_beam.evaluate()
    assert "eval_hits@1" in metrics and "eval_mrr@1" in metrics
    assert not any(key.startswith(("eval_hits@5", "eval_hits@10")) for key in metrics), metrics
    assert one_beam.predict(evaluation_sets(splits)["eval"]).predictions.shape[1] == 1


def test_evaluation_never_drops_the_last_partial_batch(tmp_path, splits, tokenizer):
    trainer = make_trainer(tmp_path, splits, tokenizer, "cross_attention", dataloader_drop_last=True,
                           per_device_eval_batch_size=5)
    assert len(splits.eval_queries) % 5 != 0, "pick sizes with a partial last evaluation batch"
    metrics = trainer.evaluate()
    assert metrics["eval_num_queries"] == len(splits.eval_queries)
    assert trainer.args.dataloader_drop_last is True  # training batches still follow the flag


def test_trainer_refuses_a_model_without_index(tmp_path, splits, tokenizer):
    model = model_class_for_variant("cross_attention")(tiny_config())
    with pytest.raises(ValueError, match="image index"):
        DSITrainer(model=model, args=Seq2SeqTrainingArguments(output_dir=str(tmp_path)),
                   images=ImageSource(splits.index), processing_class=ViTT5DSIProcessor.for_model(model.config, tokenizer))


def test_every_checkpoint_of_a_dual_encoder_searches_with_its_own_embeddings(tmp_path, splits, tokenizer):
    trainer = make_trainer(tmp_path, splits, tokenizer, "dual_encoder", max_steps=4, save_strategy="steps",
                           save_steps=2)
    trainer.train()
    from vit_t5_dsi import DSIRetriever

    embeddings = []
    for step in (2, 4):
        checkpoint = os.path.join(tmp_path, "out", f"checkpoint-{step}")
        retriever = DSIRetriever.from_pretrained(checkpoint, device="cpu")
        assert retriever.retrieve(["a red circle"], top_k=3)[0]
        embeddings.append(retriever.image_embeddings)
        expected = trainer.model.__class__.from_pretrained(checkpoint).eval()
        pixels = ViTT5DSIProcessor.from_pretrained(checkpoint)(
            images=[trainer.images.load(splits.index["image_key"][0])])["pixel_values"]
        with torch.no_grad():
            torch.testing.assert_close(expected.encode_images(pixels)[0], retriever.image_embeddings[0])
    assert not torch.equal(embeddings[0], embeddings[1]), "the second checkpoint kept the first one's embeddings"


def test_training_learns_to_write_the_identifiers(tmp_path, splits, tokenizer):
    """The fast check that learning happens at all: a tiny model memorises 23 images' identifiers (indexing) in
    a few hundred steps, far above chance (1/23), and its loss falls."""
    trainer = make_trainer(tmp_path, splits, tokenizer, "cross_attention", num_train_epochs=25,
                           learning_rate=3e-3, logging_steps=10, save_strategy="no", eval_strategy="no")
    before = trainer.evaluate()["index_hits@1"]
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = trainer.evaluate()["index_hits@1"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert after >= 0.8 and after > before, (before, after)
