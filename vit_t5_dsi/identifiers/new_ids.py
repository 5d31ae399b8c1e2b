"""Identifiers for images added to a trained index: never one another image holds or held.

- rq: each new image's embedding (from the dual encoder the ids were cut from) is quantized with the frozen
  codebooks the checkpoint stores, so its tokens mean what they mean for every other image. Where its code is
  taken (an image, or a removed image, has that id or extends it), it gets a collision suffix as at build time: the
  nearest free extra-level code (the extra codebook, fitted on colliding residuals), else a position token.
- naive and atomic: the next number never used (removed images' numbers stay used); atomic adds its token.
- semantic: refused. Its k-means tree is not stored, so a new image's leaf cannot be found the way the others'
  were, and a leaf position means nothing a caption can predict.
"""

from __future__ import annotations

import numpy as np

from ..checkpoint.checkpoint_io import UsageError
from ..checkpoint.image_index import ATOMIC_TOKEN, ImageIndex
from ..checkpoint.image_index_files import CODEBOOKS_FILE_NAME
from .residual_quantization import CODE_TOKEN, quantize_with_codebooks


def _prefixes(rows) -> set[tuple[int, ...]]:
    return {tuple(row[:d]) for row in rows for d in range(1, len(row) + 1)}


def _next_number(index: ImageIndex, template: str) -> int:
    """1 + the largest number an id of `template` ever had in this index (removed images' included)."""
    prefix, suffix = template.split("{}")
    numbers = [int(s[len(prefix):len(s) - len(suffix)]) for s in list(index.id_strings) + index.retired["id_strings"]
               if s.startswith(prefix) and s.endswith(suffix) and s[len(prefix):len(s) - len(suffix)].isdigit()]
    return max(numbers, default=-1) + 1


def _numbered_ids(index: ImageIndex, tokenizer, count: int, template: str) -> tuple[list[str], list[str]]:
    start = _next_number(index, template)
    strings = [template.format(start + i) for i in range(count)]
    added = [s for s in strings if s not in tokenizer.get_vocab()] if template == ATOMIC_TOKEN else []
    return strings, added


def _rq_ids(index: ImageIndex, tokenizer, embeddings: np.ndarray) -> tuple[list[str], list[str]]:
    if not index.codebooks:
        raise UsageError(f"This checkpoint's rq ids were built without saving their codebooks ({CODEBOOKS_FILE_NAME}, "
                         "saved since images can be added): new images cannot be quantized with the codes the others "
                         "were. Retrain it with this version (or --reindex).")
    levels = int(index.scheme_info.get("num_levels", 0))
    if not levels:
        raise UsageError("This checkpoint's rq ids do not record their number of levels (scheme_info.num_levels).")
    vocab = tokenizer.get_vocab()

    def allowed(level: int, size: int) -> np.ndarray:
        return np.asarray([c for c in range(size) if CODE_TOKEN.format(level=level, code=c) in vocab], dtype=np.int64)

    codebooks = index.codebooks
    allowed_codes = [allowed(level, len(codebooks[level])) for level in range(levels)]
    if any(len(codes) == 0 for codes in allowed_codes):
        raise UsageError("The tokenizer saved with this checkpoint has no rq code tokens: load the checkpoint's own.")
    codes, residuals = quantize_with_codebooks(embeddings, codebooks, levels, allowed_codes)
    extra = codebooks[levels] if len(codebooks) > levels else None
    extra_codes = allowed(levels, len(extra)) if extra is not None else np.zeros(0, dtype=np.int64)
    taken = _prefixes(index.taken_token_rows())
    pending: dict[str, int] = {}

    def token(name: str) -> int:  # a negative placeholder for a token the tokenizer does not have yet
        return vocab[name] if name in vocab else pending.setdefault(name, -1 - len(pending))

    strings, added = [], []
    for row, residual in zip(codes, residuals):
        base = [CODE_TOKEN.format(level=level, code=int(code)) for level, code in enumerate(row)]
        candidates = [base]
        if extra is not None and len(extra_codes):
            order = extra_codes[np.argsort(((extra[extra_codes] - residual) ** 2).sum(1), kind="stable")]
            candidates += [base + [CODE_TOKEN.format(level=levels, code=int(c))] for c in order]
        stem = candidates[1] if len(candidates) > 1 else base
        chosen = next((c for c in candidates if tuple(token(t) for t in c) not in taken), None)
        position = 0
        while chosen is None:  # every code is taken: a position token, as at build time
            candidate = stem + [CODE_TOKEN.format(level=levels + 1, code=position)]
            if tuple(token(t) for t in candidate) not in taken:
                chosen = candidate
            position += 1
        for name in chosen:
            if name not in vocab and name not in added:
                added.append(name)
        taken |= _prefixes([tuple(token(t) for t in chosen)])
        strings.append("".join(chosen))
    return strings, added


def ids_for_new_images(index: ImageIndex, tokenizer, count: int, embeddings: np.ndarray | None = None
                       ) -> tuple[list[str], list[list[int]], list[str]]:
    """Id strings, token rows and the tokens added to `tokenizer` (resize the model after) for `count` new images
    (`embeddings`: rq only, one row each, from the dual encoder the ids were cut from)."""
    if index.scheme == "rq":
        if embeddings is None or len(embeddings) != count:
            raise ValueError("rq ids for new images need one embedding per image.")
        strings, added = _rq_ids(index, tokenizer, embeddings)
    elif index.scheme in ("naive", "atomic"):
        strings, added = _numbered_ids(index, tokenizer, count, "{}" if index.scheme == "naive" else ATOMIC_TOKEN)
    else:
        raise UsageError(f"Images cannot be added to an index of {index.scheme} ids: the k-means tree they were cut "
                         "from is not stored, so a new image's leaf is unknown and its position in the leaf would "
                         "mean nothing. Retrain with --reindex, or use rq ids (the default), whose codebooks the "
                         "checkpoint keeps.")
    if added:
        tokenizer.add_tokens(added)
    rows = [list(r) for r in tokenizer(strings, add_special_tokens=False)["input_ids"]] if strings else []
    taken = index.taken_token_rows()
    clash = next((s for s, r in zip(strings, rows) if tuple(r) in taken), None)
    if clash is not None:
        raise ValueError(f"New id {clash!r} is held or was held by another image.")
    return strings, rows, added


__all__ = ["ids_for_new_images"]
