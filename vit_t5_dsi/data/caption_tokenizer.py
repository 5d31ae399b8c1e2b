"""A tokenizer trained offline on the collection's captions, for models trained without a pretrained T5.

It follows T5's special-token layout (pad 0, eos 1, unk 2, eos appended) and splits digits one per token, so
naive identifiers are digit sequences as in DSI. Saved with the checkpoint; `AutoTokenizer` reloads it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .bpe_merges import learn_bpe

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
INITIAL_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"  # digits first: naive ids are digit tokens
CONTINUING_PREFIX = "##"


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """T5-layout BPE tokenizer learnt from `captions`, identical in every run and process (`learn_bpe`)."""
    captions = list(captions)
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    word_counts = Counter(word for caption in captions
                          for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    vocab, merges = learn_bpe(word_counts, vocab_size, list(INITIAL_ALPHABET), SPECIAL_TOKENS, CONTINUING_PREFIX)
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(vocab)}, merges=merges,
                                     unk_token="<unk>", continuing_subword_prefix=CONTINUING_PREFIX))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer = _canonical_ids(tokenizer, captions)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    return _wrap(tokenizer)


def _canonical_ids(tokenizer: Tokenizer, captions: list[str]) -> Tokenizer:
    """The same tokenizer with token ids that do not depend on the run.

    Ids come in a fixed order that says what they are: the special tokens, the initial alphabet (digits first, so
    naive identifiers are the same digit tokens everywhere, then its "##" forms), the tokens the captions
    actually use, sorted, then the remaining ones, sorted."""
    data = json.loads(tokenizer.to_str())
    vocab = data["model"]["vocab"]
    pieces = (tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(c)) for c in captions)
    words = sorted({word for caption_pieces in pieces for word, _ in caption_pieces})
    used = {token for encoding in tokenizer.encode_batch([[w] for w in words], is_pretokenized=True,
                                                         add_special_tokens=False)
            for token in encoding.tokens}
    alphabet = [*INITIAL_ALPHABET, *(CONTINUING_PREFIX + c for c in INITIAL_ALPHABET)]
    fixed = [*SPECIAL_TOKENS, *(token for token in alphabet if token in vocab)]
    rest = sorted((token for token in vocab if token not in fixed), key=lambda t: (t not in used, t))
    data["model"]["vocab"] = {token: i for i, token in enumerate([*fixed, *rest])}
    return Tokenizer.from_str(json.dumps(data))


def caption_tokenizer_from_str(serialized: str) -> PreTrainedTokenizerFast:
    """The tokenizer whose `backend_tokenizer.to_str()` is `serialized` (how other processes receive the one the
    main process trained, so only one process spends the time training it)."""
    return _wrap(Tokenizer.from_str(serialized))


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


__all__ = ["train_caption_tokenizer", "caption_tokenizer_from_str"]
