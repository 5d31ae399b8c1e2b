"""A tokenizer trained offline on the collection's captions, for models trained without a pretrained T5.

It follows T5's special-token layout (pad 0, eos 1, unk 2, eos appended) and splits digits one per token, so
naive identifiers are digit sequences as in DSI. Saved with the checkpoint; `AutoTokenizer` reloads it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  continuing_subword_prefix="##",
                                  initial_alphabet=list("0123456789abcdefghijklmnopqrstuvwxyz"))
    tokenizer.train_from_iterator(captions, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return _wrap(tokenizer)


def caption_tokenizer_from_str(serialized: str) -> PreTrainedTokenizerFast:
    """The tokenizer whose `backend_tokenizer.to_str()` is `serialized` (how other processes receive the one the
    main process trained: BPE training is not deterministic across processes)."""
    return _wrap(Tokenizer.from_str(serialized))


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


__all__ = ["train_caption_tokenizer", "caption_tokenizer_from_str"]
