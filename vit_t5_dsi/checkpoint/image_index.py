"""Image keys <-> identifiers (naive, atomic, semantic, rq), saved beside the weights, with the decoding constraint."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property

import numpy as np
import torch

from .id_trie import IdTrie, TrieConstrainedLogitsProcessor, padded_token_table, prefix_allowed_tokens_fn
from .image_index_files import EMBEDDINGS_FILE_NAME, ImageIndexFiles
from .index_arrays import IdStrings, KeyColumn, StringColumn, TokenRows, TokenTable

SCHEMES = ("naive", "atomic", "semantic", "rq")
EMBEDDING_SCHEMES = ("semantic", "rq")  # the schemes built from image embeddings
ATOMIC_TOKEN = "<img_{}>"


class KeyPositions(Mapping):
    """key -> position, answered by the key column (no per-image dict)."""

    def __init__(self, keys: KeyColumn):
        self._keys = keys

    def __getitem__(self, key) -> int:
        position = self._keys.position(str(key))
        if position < 0:
            raise KeyError(key)
        return position

    def __contains__(self, key) -> bool:
        return self._keys.position(str(key)) >= 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class ImageIndex(ImageIndexFiles):
    """The collection a model memorises: for each image key, its identifier string and token ids.

    `token_ids` exclude eos (the trie and `labels_for` add it). Positions (0..N-1) are the index's own ids.
    `embeddings` (N, d), when set, are the indexed images' dense embeddings (the dual encoder's search index);
    they are saved and loaded with the identifiers, so one object owns everything a model searches over.

    Everything per image lives in numpy columns (`index_arrays`): keys as one fixed-width bytes array plus its
    sort order, token ids column by column in the smallest dtype that fits, id strings derived from a rule
    (or stored as one byte buffer). `keys`, `id_strings`, `token_ids` and `position_of_key` are read-only views
    over them that behave like the lists and dict they used to be.
    """

    def __init__(self, keys: Sequence[str], id_strings: Sequence[str], token_ids: Sequence[Sequence[int]],
                 scheme: str, eos_token_id: int, pad_token_id: int, added_tokens: Sequence[str] = (),
                 embeddings: torch.Tensor | None = None, scheme_info: dict | None = None):
        if not (len(keys) == len(id_strings) == len(token_ids)):
            raise ValueError("keys, id_strings and token_ids must have one entry per image.")
        key_column = keys if isinstance(keys, KeyColumn) else KeyColumn.from_strings(keys)
        if isinstance(token_ids, TokenRows):
            tokens = token_ids._tokens
        else:
            table, lengths = padded_token_table(token_ids) if len(token_ids) else (np.zeros((0, 0), np.int32),
                                                                                    np.zeros(0, np.int64))
            tokens = TokenTable.from_table(table, lengths)
        if isinstance(id_strings, IdStrings):
            strings = IdStrings(len(tokens), tokens, id_strings.template, id_strings.pieces, id_strings.column)
        else:
            strings = IdStrings.infer(id_strings, token_ids, tokens, templates=("{}", ATOMIC_TOKEN))
        self._setup(key_column, tokens, strings, scheme, eos_token_id, pad_token_id, added_tokens, embeddings,
                    scheme_info)

    def _setup(self, keys: KeyColumn, tokens: TokenTable, id_strings: IdStrings, scheme: str, eos_token_id: int,
               pad_token_id: int, added_tokens: Sequence[str], embeddings, scheme_info, source: str | None = None,
               rows_checked: bool = False) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}.")
        if not (len(keys) == len(tokens) == len(id_strings)):
            raise ValueError("keys, id_strings and token_ids must have one entry per image.")
        self._keys, self._tokens, self._id_strings = keys, tokens, id_strings
        self.scheme = scheme
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        self.added_tokens = list(added_tokens)
        self.embeddings = embeddings
        self.scheme_info = dict(scheme_info or {})  # how the ids were built (rq: codes, usage, collisions)
        self.code_vectors: dict[int, np.ndarray] = {}  # rq, when just built: token id -> its code's vector
        self.codebooks: list[np.ndarray] | None = None  # rq: each level's code vectors (saved; frozen after build)
        # ids of removed images: never given to another image (the model learned them for the removed one)
        self.retired: dict[str, list] = {"id_strings": [], "token_ids": []}
        # where each image's file was when the collection was indexed (see `record_image_paths`)
        self.image_root: str | None = None
        self.image_files: Sequence[str | None] | None = None
        self._max_token_id = tokens.max_token() if len(tokens) else -1
        for d, (column, base) in enumerate(zip(tokens.columns, tokens.bases)):
            if 0 <= self.eos_token_id - base <= np.iinfo(column.dtype).max and bool(
                    ((column == self.eos_token_id - base) & (tokens.lengths > d)).any()):
                raise ValueError("An identifier contains the eos token; eos may only end it.")
        duplicate = tokens.first_duplicate() if len(tokens) > 1 and not rows_checked else None
        if duplicate is not None:
            previous, position = duplicate
            raise ValueError(
                f"{source + ': ' if source else ''}Images {keys[previous]!r} and {keys[position]!r} got the same "
                f"identifier tokens {tokens.row(position)} (ids {id_strings[previous]!r}, {id_strings[position]!r}): "
                "the tokenizer cannot tell these identifiers apart.")

    # ----- the per-image columns, as the lists and dict they used to be -----------------------------------
    @property
    def keys(self) -> KeyColumn:
        """Image keys in position order (a read-only sequence of str; `list(index.keys)` for a real list)."""
        return self._keys

    @property
    def id_strings(self) -> IdStrings:
        return self._id_strings

    @property
    def token_ids(self) -> TokenRows:
        """Each image's identifier tokens (without eos), a read-only sequence of lists."""
        return TokenRows(self._tokens)

    @property
    def position_of_key(self) -> KeyPositions:
        """key -> position (a read-only mapping answered by binary search; KeyError for an unknown key)."""
        return KeyPositions(self._keys)

    def token_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, max_len) int32 token ids (-1 past each id's end) and the (N,) id lengths, eos not included."""
        return self._tokens.table(), self._tokens.lengths

    def positions_of(self, keys) -> np.ndarray:
        """Position of each key (-1 for a key the index does not hold), vectorised."""
        return self._keys.positions(keys)

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-image columns (keys, tokens, id strings, image files; embeddings excluded)."""
        files = self.image_files.nbytes if isinstance(self.image_files, StringColumn) else 0
        return (self._keys.values.nbytes + self._keys.order.nbytes + self._tokens.nbytes + self._id_strings.nbytes
                + files)

    # ----- construction ----------------------------------------------------------------------------
    @classmethod
    def from_token_table(cls, keys: Sequence[str] | np.ndarray, token_table: np.ndarray,
                         lengths: np.ndarray | None = None, *, scheme: str, eos_token_id: int, pad_token_id: int,
                         id_strings: Sequence[str] | None = None, id_string_pieces: dict[int, str] | None = None,
                         added_tokens: Sequence[str] = (), embeddings: torch.Tensor | None = None,
                         scheme_info: dict | None = None) -> "ImageIndex":
        """Catalogue-scale construction from arrays, with no Python object per image: `keys` as strings or a
        fixed-width bytes array (UTF-8), `token_table` (N, max_len) with row i's tokens in its first `lengths[i]`
        cells (without lengths: up to its first negative cell). Id strings are either given, or each id is the
        concatenation of its tokens' strings (`id_string_pieces`, as for rq ids), or (neither) the position."""
        token_table = np.asarray(token_table)
        if lengths is None:
            negative = token_table < 0
            lengths = np.where(negative.any(1), negative.argmax(1), token_table.shape[1])
        if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
            key_column = KeyColumn(keys)
            key_column.check_distinct()
        else:
            key_column = KeyColumn.from_strings(keys)
        if len(key_column) != len(token_table):
            raise ValueError("keys, id_strings and token_ids must have one entry per image.")
        tokens = TokenTable.from_table(token_table, lengths)
        if id_strings is not None:
            strings = IdStrings.infer(id_strings, TokenRows(tokens), tokens, templates=("{}", ATOMIC_TOKEN))
        elif id_string_pieces is not None:
            missing = np.setdiff1d(tokens.used_tokens(), np.fromiter(id_string_pieces, dtype=np.int64))
            if len(missing):
                raise ValueError(f"id_string_pieces has no string for the tokens {missing[:5].tolist()}.")
            strings = IdStrings(len(tokens), tokens, pieces={int(t): str(p) for t, p in id_string_pieces.items()})
        else:
            strings = IdStrings(len(tokens), tokens, template="{}")
        index = cls.__new__(cls)
        index._setup(key_column, tokens, strings, scheme, eos_token_id, pad_token_id, added_tokens, embeddings,
                     scheme_info)
        return index

    def resize_model_embeddings(self, model) -> None:
        """Grow the model's vocabulary to cover every identifier token (the atomic scheme's new tokens)."""
        needed = self.max_token_id + 1
        if model.get_input_embeddings().num_embeddings < needed:
            model.resize_token_embeddings(needed)

    # ----- lookups ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    @property
    def max_token_id(self) -> int:
        return self._max_token_id

    @property
    def max_id_length(self) -> int:
        """Longest identifier in tokens, eos included."""
        return self._tokens.width + 1

    def labels_for(self, key: str) -> list[int]:
        return self._tokens.row(self.position_of_key[str(key)]) + [self.eos_token_id]

    def decode(self, sequences: torch.Tensor | np.ndarray, num_start_tokens: int = 1) -> np.ndarray:
        """Index position of each generated row (start token first); -1 for anything that is not an identifier."""
        sequences = np.asarray(sequences.cpu() if isinstance(sequences, torch.Tensor) else sequences)
        return self._positions_of_labels(sequences.reshape(len(sequences), -1)[:, num_start_tokens:])

    def _positions_of_labels(self, rows: np.ndarray) -> np.ndarray:
        """Vectorised `position_of_label` over the rows of a 2-D array."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape[1] == 0 or len(self) == 0:
            return np.full(len(rows), -1, dtype=np.int64)
        is_eos = rows == self.eos_token_id
        has_eos = is_eos.any(1)
        end = is_eos.argmax(1)
        after = np.arange(rows.shape[1])[None, :] > end[:, None]
        filler = (rows == self.pad_token_id) | (rows == -100) | is_eos
        clean = has_eos & ~(after & ~filler).any(1)
        positions = self._tokens.find(rows, np.where(clean, end, 0))
        return np.where(clean, positions, -1)

    def position_of_label(self, tokens: Sequence[int]) -> int:
        """Position of a token row that must end with eos (then pad / -100 / nothing); -1 otherwise."""
        tokens = list(tokens)
        if not tokens:
            return -1
        return int(self._positions_of_labels(np.asarray([tokens], dtype=np.int64))[0])

    def embeddings_for(self, keys: Sequence[str]) -> torch.Tensor:
        """This index's embeddings in the order of `keys` (another index's images); a ValueError names the keys
        it has no embedding for."""
        if self.embeddings is None:
            raise ValueError(f"This image index has no embeddings ({EMBEDDINGS_FILE_NAME}).")
        positions = self.positions_of(keys)
        missing = np.flatnonzero(positions < 0)
        if len(missing):
            raise ValueError(f"no embedding for {len(missing)} of the {len(keys)} indexed images (e.g. "
                             f"{[keys[int(i)] for i in missing[:3]]})")
        return self.embeddings[torch.from_numpy(positions)]

    def identifier_only_token_ids(self, caption_token_ids) -> list[int]:
        """Tokens that identifiers use and no caption does (`caption_token_ids`: the tokenized training captions):
        what a caption must never contain, so the caption decoder cannot write an identifier."""
        in_captions = {int(t) for ids in caption_token_ids for t in ids}
        return sorted(set(self._tokens.used_tokens().tolist()) - in_captions)

    # ----- the decoding constraint -----------------------------------------------------------------
    @cached_property
    def trie(self) -> IdTrie:
        tokens = self._tokens
        return IdTrie.from_columns(tokens.columns, tokens.lengths, self.eos_token_id, self.pad_token_id,
                                   order=tokens.order, bases=tokens.bases)

    # ----- images added and removed (vit_t5_dsi.updates) -------------------------------------------
    def _image_paths(self) -> list[str | None] | None:
        if self.image_files is None:
            return None
        return [os.path.join(self.image_root, f) if f is not None else None for f in self.image_files]

    def _carry_over(self, other: "ImageIndex", paths: list[str | None] | None) -> "ImageIndex":
        other.codebooks = self.codebooks
        other.retired = {"id_strings": list(self.retired["id_strings"]),
                         "token_ids": [list(row) for row in self.retired["token_ids"]]}
        if paths is not None and any(paths):
            other.record_image_paths(paths)
        return other

    def without(self, keys: Sequence[str]) -> "ImageIndex":
        """A new index without `keys` (a KeyError names the first one not indexed). Their ids are retired: they can
        no longer be decoded and are never given to another image; their embeddings are dropped."""
        positions = self.positions_of([str(k) for k in keys])
        unknown = [str(keys[i]) for i in np.flatnonzero(positions < 0)]
        if unknown:
            raise KeyError(f"{len(unknown)} of the keys to remove are not indexed (e.g. {unknown[:3]}).")
        drop = np.zeros(len(self), dtype=bool)
        drop[positions] = True
        keep = np.flatnonzero(~drop)
        table, lengths = self._tokens.table(keep), self._tokens.lengths[keep]
        index = ImageIndex.from_token_table(
            [self.keys[int(p)] for p in keep], table, lengths, scheme=self.scheme, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, id_strings=[self.id_strings[int(p)] for p in keep],
            added_tokens=self.added_tokens, scheme_info=self.scheme_info,
            embeddings=self.embeddings[torch.from_numpy(keep)] if self.embeddings is not None else None)
        paths = self._image_paths()
        self._carry_over(index, [paths[int(p)] for p in keep] if paths is not None else None)
        for p in np.flatnonzero(drop):
            index.retired["id_strings"].append(self.id_strings[int(p)])
            index.retired["token_ids"].append(self._tokens.row(int(p)))
        return index

    def extended(self, keys: Sequence[str], id_strings: Sequence[str], token_ids: Sequence[Sequence[int]],
                 embeddings: torch.Tensor | None = None, image_paths: Sequence[str | None] | None = None,
                 added_tokens: Sequence[str] = ()) -> "ImageIndex":
        """A new index with these images appended (a ValueError names a key already indexed, or an identifier
        another image holds or held)."""
        keys = [str(k) for k in keys]
        known = [k for k, p in zip(keys, self.positions_of(keys)) if p >= 0]
        if known:
            raise ValueError(f"{len(known)} of the images to add are already indexed (e.g. keys {known[:3]}).")
        retired = {tuple(row) for row in self.retired["token_ids"]}
        reused = [k for k, row in zip(keys, token_ids) if tuple(row) in retired]
        if reused:
            raise ValueError(f"images {reused[:3]} would get the id of a removed image.")
        if (self.embeddings is None) != (embeddings is None):
            raise ValueError("The index has embeddings: every added image needs one (and only then).")
        rows = list(self.token_ids) + [list(map(int, row)) for row in token_ids]
        index = ImageIndex(list(self.keys) + keys, list(self.id_strings) + list(id_strings), rows, self.scheme,
                           self.eos_token_id, self.pad_token_id, list(self.added_tokens) + list(added_tokens),
                           torch.cat([self.embeddings, embeddings.to(self.embeddings.dtype)])
                           if embeddings is not None else None, self.scheme_info)
        old = self._image_paths()
        paths = (old or [None] * len(self)) + list(image_paths or [None] * len(keys))
        return self._carry_over(index, paths if any(paths) else None)

    def taken_token_rows(self) -> set[tuple[int, ...]]:
        """Every id this index holds or held (removed images' ids stay taken)."""
        return {tuple(row) for row in self.token_ids} | {tuple(row) for row in self.retired["token_ids"]}

    # ----- image files -----------------------------------------------------------------------------
    def record_image_paths(self, paths: Sequence[str | None]) -> None:
        """Remember each image's file (one entry per key, None for an image held as bytes), as a root directory
        plus paths relative to it, so `image_path(..., image_dir=NEW_ROOT)` finds a moved collection."""
        if len(paths) != len(self):
            raise ValueError(f"{len(paths)} image paths for the {len(self)} images of the index.")
        absolute = [os.path.abspath(p) if p else None for p in paths]
        present = [p for p in absolute if p]
        if not present:
            self.image_root, self.image_files = None, None
            return
        self.image_root = os.path.commonpath([os.path.dirname(p) for p in present])
        self.image_files = [os.path.relpath(p, self.image_root) if p else None for p in absolute]

    def image_path(self, position: int, image_dir: str | os.PathLike | None = None) -> str | None:
        """The file of the image at `position` (under `image_dir` instead of the recorded root, when given), or
        None when the index records none, it does not exist on this machine, or it lies outside the image folder:
        an index from elsewhere (the Hub) whose `image_files` hold `../` or absolute paths, or a symlink in the
        folder that points out of it, never names a file beyond it (a web app would serve it)."""
        if self.image_files is None or self.image_files[position] is None:
            return None
        root = os.fspath(image_dir) if image_dir else self.image_root
        path = os.path.join(root, self.image_files[position])
        if not is_inside(path, root):
            return None
        return path if os.path.isfile(path) else None

    def logits_processor(self) -> TrieConstrainedLogitsProcessor:
        return TrieConstrainedLogitsProcessor(self.trie)

    def prefix_allowed_tokens_fn(self):
        return prefix_allowed_tokens_fn(self.trie)

    def check_vocabulary(self, vocab_size: int) -> None:
        if self.max_token_id >= vocab_size:
            raise ValueError(
                f"The image index uses token id {self.max_token_id} but the model's vocabulary has {vocab_size} "
                "tokens: the index and the weights do not belong together (atomic ids need resized embeddings).")

    def check_tokenizer(self, tokenizer) -> None:
        """Fail clearly when a tokenizer would not reproduce this index's identifier tokens."""
        missing = [t for t in self.added_tokens if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"The tokenizer lacks {len(missing)} identifier tokens of this image index "
                             f"(e.g. {missing[:3]}); load the tokenizer saved with the checkpoint.")
        sample = range(0, len(self), max(1, len(self) // 1000))
        retokenized = tokenizer([self.id_strings[i] for i in sample], add_special_tokens=False)["input_ids"]
        for position, tokens in zip(sample, retokenized):
            if list(tokens) != self.token_ids[position]:
                raise ValueError(
                    f"The tokenizer turns identifier {self.id_strings[position]!r} (image "
                    f"{self.keys[position]!r}) into {list(tokens)}, but the index holds {self.token_ids[position]}: "
                    "load the tokenizer saved with the checkpoint.")


def is_inside(path: str, folder: str) -> bool:
    """`path`, symlinks and `..` resolved, lies inside `folder` (resolved too)."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


__all__ = ["ImageIndex", "KeyPositions", "is_inside", "SCHEMES", "EMBEDDING_SCHEMES", "ATOMIC_TOKEN"]
