"""Image keys <-> identifiers (naive, atomic, semantic, rq), saved beside the weights, with the decoding constraint."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from .atomic_io import atomic_write, atomic_write_text
from .id_trie import IdTrie, TrieConstrainedLogitsProcessor, padded_token_table, prefix_allowed_tokens_fn
from .index_arrays import (IdStrings, KeyColumn, KeyPositions, StringColumn, TokenRows, TokenTable,
                           check_row_order)
from .residual_quantization import residual_quantize
from .semantic_ids import hierarchical_kmeans_ids

INDEX_FILE_NAME = "image_index.json"  # the whole index (up to JSON_LIMIT images), else a header naming its columns
ARRAYS_FILE_PREFIX, ARRAYS_FILE_SUFFIX = "image_index-", ".safetensors"  # the per-image columns (larger indexes)
INDEX_FORMAT, INDEX_FORMAT_VERSION = "vit-t5-dsi image index", 2
# Up to this many images an index is saved as one JSON file of lists (the first layout: readable, and loadable by
# older code); above it, as a small JSON header plus a safetensors file of columns (~30 bytes per image).
JSON_LIMIT = 10_000
EMBEDDINGS_FILE_NAME = "image_embeddings.safetensors"
# what `from_pretrained` passes on to the Hub download of the index, like transformers' own loaders
HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download")
SCHEMES = ("naive", "atomic", "semantic", "rq")
EMBEDDING_SCHEMES = ("semantic", "rq")  # the schemes built from image embeddings
ATOMIC_TOKEN = "<img_{}>"


def checkpoint_file(name_or_path: str | os.PathLike, filename: str, subfolder: str | None = None,
                    **download_options) -> str | None:
    """Local path of `filename` in a checkpoint directory or Hub repo; None only when the file does not exist.

    transformers' `cached_file` also returns None when the Hub cannot be reached, which would turn a network or
    authentication problem into a silently missing index; here only "no such file" is None.
    """
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, subfolder or "", filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    in_repo = f"{subfolder}/{filename}" if subfolder else filename
    cached = try_to_load_from_cache(str(name_or_path), in_repo, cache_dir=download_options.get("cache_dir"),
                                    revision=download_options.get("revision"))
    if cached is _CACHED_NO_EXIST and not download_options.get("force_download"):
        return None  # the Hub already said this repo has no such file
    try:
        return hf_hub_download(str(name_or_path), filename, subfolder=subfolder, **download_options)
    except RemoteEntryNotFoundError:
        return None


def index_file_names(directory: str | os.PathLike) -> list[str]:
    """The files of an index saved in `directory` that exist there: `image_index.json`, its columns files
    (`image_index-<digest>.safetensors`, stale ones included) and `image_embeddings.safetensors`. For code that
    clears or checks a model's state (their names are not all fixed)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name in (INDEX_FILE_NAME, EMBEDDINGS_FILE_NAME)
                  or (name.startswith(ARRAYS_FILE_PREFIX) and name.endswith(ARRAYS_FILE_SUFFIX)))


class ImageIndex:
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
    def build(cls, keys: Sequence[str], tokenizer, scheme: str = "naive", embeddings: np.ndarray | None = None,
              num_clusters: int = 10, max_leaf_size: int = 100, seed: int = 0, rq_num_levels: int = 3,
              rq_codes_per_level: int = 16) -> "ImageIndex":
        """Assign identifiers. `atomic` and `rq` add tokens to `tokenizer` (resize the model after:
        `index.resize_model_embeddings(model)`); `semantic` and `rq` need one embedding row per key."""
        keys = [str(k) for k in keys]
        info: dict = {}
        added: list[str] = []
        if scheme in EMBEDDING_SCHEMES:
            if embeddings is None:
                raise ValueError(f"scheme={scheme!r} needs `embeddings` (one row per image).")
            if len(embeddings) != len(keys):
                raise ValueError(f"scheme={scheme!r}: {len(embeddings)} embedding rows for {len(keys)} images.")
        if scheme == "naive":
            id_strings = [str(i) for i in range(len(keys))]
        elif scheme == "atomic":
            id_strings = added = [ATOMIC_TOKEN.format(i) for i in range(len(keys))]
        elif scheme == "semantic":
            id_strings = hierarchical_kmeans_ids(embeddings, num_clusters, max_leaf_size, seed)
        elif scheme == "rq":
            codes = residual_quantize(embeddings, rq_num_levels, rq_codes_per_level, seed)
            rows = [codes.id_tokens(row) for row in range(len(keys))]
            # written without spaces: a tokenizer splits added tokens out exactly, with nothing between them
            id_strings = ["".join(tokens) for tokens in rows]
            added = sorted({t for tokens in rows for t in tokens},
                           key=lambda t: tuple(int(x) for x in t[2:-1].split("_c")))
            info = codes.summary()
        else:
            raise ValueError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}.")
        if added:
            tokenizer.add_tokens(added)
        token_ids = cls._tokenize(tokenizer, id_strings)
        if scheme == "rq":
            expected = [tokenizer.convert_tokens_to_ids(tokens) for tokens in rows]
            wrong = next((i for i, (got, want) in enumerate(zip(token_ids, expected)) if list(got) != want), None)
            if wrong is not None:
                raise ValueError(f"The tokenizer splits rq id {id_strings[wrong]!r} into {token_ids[wrong]}, not one "
                                 f"token per code {expected[wrong]}.")
        index = cls(keys, id_strings, token_ids, scheme, tokenizer.eos_token_id, tokenizer.pad_token_id, added,
                    scheme_info=info)
        if scheme == "rq":
            index.code_vectors = {tokenizer.convert_tokens_to_ids(name): vector
                                  for name, vector in codes.code_vectors().items() if name in added}
        return index

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

    @staticmethod
    def _tokenize(tokenizer, id_strings: Sequence[str]) -> list[list[int]]:
        return tokenizer(list(id_strings), add_special_tokens=False)["input_ids"]

    def resize_model_embeddings(self, model) -> None:
        """Grow the model's vocabulary to cover every identifier token (the atomic scheme's new tokens)."""
        needed = self.max_token_id + 1
        if model.get_input_embeddings().num_embeddings < needed:
            model.resize_token_embeddings(needed)

    @torch.no_grad()
    def initialise_code_embeddings(self, model, seed: int = 0) -> int:
        """Start each rq code token's embedding (tied input/output rows) at its code's vector (GENIUS), so the
        decoder begins with tokens whose similarities are those of the image embeddings. Vectors are mapped to
        the model's width by a fixed random orthogonal map when the widths differ, and scaled to the embeddings'
        mean norm. Returns the number of rows set (0 when the index was not just built with rq ids)."""
        if not self.code_vectors:
            return 0
        weight = model.get_input_embeddings().weight
        rows = torch.as_tensor(list(self.code_vectors))
        vectors = torch.as_tensor(np.stack(list(self.code_vectors.values())), dtype=torch.float32)
        if vectors.shape[1] != weight.shape[1]:
            generator = torch.Generator().manual_seed(seed)
            mixing = torch.linalg.qr(torch.randn(max(vectors.shape[1], weight.shape[1]),
                                                 min(vectors.shape[1], weight.shape[1]), generator=generator))[0]
            vectors = vectors @ (mixing if vectors.shape[1] > weight.shape[1] else mixing.T)
        norm = weight.norm(dim=1).mean()
        vectors = torch.nn.functional.normalize(vectors, dim=1) * norm
        weight[rows] = vectors.to(weight.dtype).to(weight.device)
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != weight.data_ptr():
            output.weight[rows] = vectors.to(output.weight.dtype).to(output.weight.device)
        return len(rows)

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
        None when the index records none or it does not exist on this machine."""
        if self.image_files is None or self.image_files[position] is None:
            return None
        path = os.path.join(os.fspath(image_dir) if image_dir else self.image_root, self.image_files[position])
        return path if os.path.isfile(path) else None

    def logits_processor(self) -> TrieConstrainedLogitsProcessor:
        return TrieConstrainedLogitsProcessor(self.trie)

    def prefix_allowed_tokens_fn(self):
        return prefix_allowed_tokens_fn(self.trie)

    # ----- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The identifiers as JSON-able data, today's and the first layout of `image_index.json` (embeddings
        travel separately, as tensors). Builds Python lists of everything: for small indexes and messages."""
        return {"scheme": self.scheme, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                "added_tokens": self.added_tokens, "scheme_info": self.scheme_info, "keys": list(self.keys),
                "id_strings": list(self.id_strings), "token_ids": list(self.token_ids),
                **({"image_root": self.image_root, "image_files": list(self.image_files)}
                   if self.image_files is not None else {})}

    def _arrays(self) -> dict[str, np.ndarray]:
        keys = self._keys.values
        arrays = {"keys": np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), keys.dtype.itemsize),
                  "key_order": self._keys.order.astype(np.int32),
                  "token_lengths": self._tokens.lengths, "token_order": self._tokens.order.astype(np.int32)}
        for d, column in enumerate(self._tokens.columns):
            arrays[f"token_column_{d}"] = column
        strings = self._id_strings.column
        if strings is not None:
            arrays["id_string_bytes"], arrays["id_string_offsets"] = strings.data, strings.offsets
        if self.image_files is not None:
            files = (self.image_files if isinstance(self.image_files, StringColumn)
                     else StringColumn.from_strings(self.image_files))
            arrays["image_file_bytes"], arrays["image_file_offsets"] = files.data, files.offsets
            if files.present is not None:
                arrays["image_file_present"] = files.present.astype(np.uint8)
        return {name: np.ascontiguousarray(value) for name, value in arrays.items()}

    def save(self, directory: str | os.PathLike, columns: bool | None = None) -> str:
        """Write `image_index.json` (and `image_embeddings.safetensors` when there are embeddings) atomically:
        a crash never leaves half an index. A stale embeddings file from an earlier save is removed.

        `columns` (default: above `JSON_LIMIT` images) writes the per-image data to a safetensors file named by
        its content digest, `image_index-<digest>.safetensors`, before the header that names it, so a crash
        between the two leaves the earlier header with its own columns; columns files of earlier saves are
        removed after. Otherwise the whole index is the JSON file (lists, the first layout)."""
        directory = os.fspath(directory)
        columns = len(self) > JSON_LIMIT if columns is None else columns
        embeddings_path = os.path.join(directory, EMBEDDINGS_FILE_NAME)
        if self.embeddings is not None:
            from safetensors.torch import save_file

            tensor = self.embeddings.detach().float().cpu().contiguous()
            if len(tensor) != len(self):
                raise ValueError(f"ImageIndex.embeddings has {len(tensor)} rows for {len(self)} images.")
            atomic_write(embeddings_path, lambda tmp: save_file({"image_embeddings": tensor}, tmp))
        elif os.path.exists(embeddings_path):
            os.unlink(embeddings_path)
        arrays_name = self._save_columns(directory) if columns else None
        text = json.dumps(self._header(arrays_name) if columns else self.to_dict())
        path = atomic_write_text(os.path.join(directory, INDEX_FILE_NAME), text)
        for name in os.listdir(directory):
            if name.startswith(ARRAYS_FILE_PREFIX) and name.endswith(ARRAYS_FILE_SUFFIX) and name != arrays_name:
                os.unlink(os.path.join(directory, name))
        return path

    def _save_columns(self, directory: str) -> str:
        from safetensors.numpy import save_file

        arrays = self._arrays()
        digest = hashlib.sha256()
        for name in sorted(arrays):
            digest.update(f"{name}:{arrays[name].dtype.str}:{arrays[name].shape};".encode())
            digest.update(memoryview(arrays[name]).cast("B"))
        self._digest = digest.hexdigest()
        arrays_name = f"{ARRAYS_FILE_PREFIX}{self._digest[:16]}{ARRAYS_FILE_SUFFIX}"
        atomic_write(os.path.join(directory, arrays_name),
                     lambda tmp: save_file(arrays, tmp, metadata={"digest": self._digest}))
        return arrays_name

    def _header(self, arrays_name: str) -> dict:
        return {"format": INDEX_FORMAT, "version": INDEX_FORMAT_VERSION, "arrays_file": arrays_name,
                "digest": self._digest, "num_images": len(self), "scheme": self.scheme,
                "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                "added_tokens": self.added_tokens, "scheme_info": self.scheme_info,
                "token_column_bases": self._tokens.bases, "id_string_rule": self._id_strings.rule(),
                **({"image_root": self.image_root} if self.image_files is not None else {})}

    @classmethod
    def from_dict(cls, data: dict, source: str = "image index", embeddings: torch.Tensor | None = None
                  ) -> "ImageIndex":
        """From the lists of `to_dict` (the first layout of `image_index.json`)."""
        try:
            index = cls(data["keys"], data["id_strings"], data["token_ids"], data["scheme"], data["eos_token_id"],
                        data["pad_token_id"], data.get("added_tokens", []), embeddings,
                        data.get("scheme_info"))
        except KeyError as err:
            raise ValueError(f"{source}: image index is missing the field {err.args[0]!r}.") from err
        except TypeError as err:
            raise ValueError(f"{source}: not an image index ({err}).") from err
        files = data.get("image_files")
        if files is not None:
            if not isinstance(files, list) or len(files) != len(index) or not isinstance(data.get("image_root"), str):
                raise ValueError(f"{source}: image_files must list one path per image, with image_root.")
            index.image_root, index.image_files = data["image_root"], files
        return index

    @classmethod
    def from_arrays(cls, header: dict, arrays_path: str | os.PathLike, source: str = "image index",
                    embeddings: torch.Tensor | None = None) -> "ImageIndex":
        """From a header (`image_index.json`) and its columns file: numpy reads, no Python loop per image."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(arrays_path), framework="np") as f:
                stored_digest = (f.metadata() or {}).get("digest")
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{arrays_path}: unreadable image index columns ({err}).") from err
        if stored_digest != header.get("digest"):
            raise ValueError(f"{source} and {arrays_path} come from different saves (digest {header.get('digest')} "
                             f"vs {stored_digest}).")
        try:
            count = int(header["num_images"])
            raw = arrays["keys"]
            keys = KeyColumn(np.ascontiguousarray(raw).view(f"S{max(1, raw.shape[1])}").reshape(len(raw))
                             if raw.shape[1] else np.zeros(len(raw), dtype="S1"), arrays["key_order"])
            bases = header["token_column_bases"]
            tokens = TokenTable([arrays[f"token_column_{d}"] for d in range(len(bases))], bases,
                                arrays["token_lengths"])
            tokens._order = arrays["token_order"]
            rule = header["id_string_rule"]
            column = None
            if "stored" in rule:
                column = StringColumn(arrays["id_string_bytes"], arrays["id_string_offsets"])
                column.check(count, source)
            pieces = {int(t): p for t, p in rule["pieces"].items()} if "pieces" in rule else None
            id_strings = IdStrings(count, tokens, rule.get("template"), pieces, column)
        except KeyError as err:
            raise ValueError(f"{source}: image index is missing the field {err.args[0]!r}.") from err
        if not (len(keys) == len(keys.order) == len(tokens) == len(tokens.order) == count) or any(
                len(c) != count for c in tokens.columns):
            raise ValueError(f"{source}: the index columns do not hold {count} images each.")
        if count and int(tokens.lengths.min()) < 1:
            raise ValueError(f"{source}: an identifier has no tokens.")
        keys.check_sorted(source)
        check_row_order(tokens.padded_columns(), tokens.order, source)
        index = cls.__new__(cls)
        index._setup(keys, tokens, id_strings, header["scheme"], header["eos_token_id"], header["pad_token_id"],
                     header.get("added_tokens", []), embeddings, header.get("scheme_info"), source,
                     rows_checked=True)  # check_row_order above: the rows are distinct
        if "image_file_bytes" in arrays:
            present = arrays.get("image_file_present")
            files = StringColumn(arrays["image_file_bytes"], arrays["image_file_offsets"],
                                 present.astype(bool) if present is not None else None)
            files.check(count, source)
            if not isinstance(header.get("image_root"), str):
                raise ValueError(f"{source}: image_files must list one path per image, with image_root.")
            index.image_root, index.image_files = header["image_root"], files
        return index

    @staticmethod
    def _read_header(path: str) -> dict:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: the image index is not valid JSON ({err}).") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the image index is not a JSON object.")
        if "format" in data and data.get("format") != INDEX_FORMAT or int(data.get("version", 1)) > \
                INDEX_FORMAT_VERSION:
            raise ValueError(f"{path}: an image index of format {data.get('format')!r} version "
                             f"{data.get('version')}; this code reads {INDEX_FORMAT!r} up to version "
                             f"{INDEX_FORMAT_VERSION} (load the checkpoint with its own code).")
        return data

    @classmethod
    def load(cls, path: str | os.PathLike, embeddings_path: str | os.PathLike | None = None,
             arrays_path: str | os.PathLike | None = None) -> "ImageIndex":
        """From `image_index.json` (or the directory holding it) and the columns file it names, or from the
        first layout (every list in the JSON file); a corrupt file is an error naming it."""
        path = os.path.join(path, INDEX_FILE_NAME) if os.path.isdir(path) else os.fspath(path)
        if embeddings_path is None and os.path.exists(os.path.join(os.path.dirname(path), EMBEDDINGS_FILE_NAME)):
            embeddings_path = os.path.join(os.path.dirname(path), EMBEDDINGS_FILE_NAME)
        data = cls._read_header(path)
        embeddings = None
        if embeddings_path is not None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                embeddings = load_file(embeddings_path)["image_embeddings"]
            except (SafetensorError, KeyError, OSError) as err:
                raise ValueError(f"{embeddings_path}: unreadable image embeddings ({err}).") from err
        if "format" in data:
            if not isinstance(data.get("arrays_file"), str) or os.path.basename(data["arrays_file"]) != \
                    data["arrays_file"]:
                raise ValueError(f"{path}: the image index header names no columns file.")
            arrays_path = arrays_path or os.path.join(os.path.dirname(path), data["arrays_file"])
            index = cls.from_arrays(data, arrays_path, path, embeddings)
        else:
            index = cls.from_dict(data, path, embeddings)
        if embeddings is not None and len(embeddings) != len(index):
            raise ValueError(f"{embeddings_path}: {len(embeddings)} embeddings for the {len(index)} images of {path}.")
        return index

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> "ImageIndex | None":
        """The index saved beside a checkpoint (a local directory or a Hub repo), or None when it has none.

        Only a missing file means "no index": a corrupt file, a network or an authentication error is raised as
        itself. `revision`, `token`, `cache_dir`, `subfolder` (and the other download options) are honoured.
        """
        options = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS and v is not None}
        index_path = checkpoint_file(name_or_path, INDEX_FILE_NAME, **options)
        if index_path is None:
            return None
        header = cls._read_header(index_path)
        arrays_path = None
        if "format" in header and isinstance(header.get("arrays_file"), str):
            arrays_path = checkpoint_file(name_or_path, header["arrays_file"], **options)
            if arrays_path is None:
                raise ValueError(f"{index_path}: the image index columns {header['arrays_file']!r} are missing.")
        return cls.load(index_path, checkpoint_file(name_or_path, EMBEDDINGS_FILE_NAME, **options), arrays_path)

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
        retokenized = self._tokenize(tokenizer, [self.id_strings[i] for i in sample])
        for position, tokens in zip(sample, retokenized):
            if list(tokens) != self.token_ids[position]:
                raise ValueError(
                    f"The tokenizer turns identifier {self.id_strings[position]!r} (image "
                    f"{self.keys[position]!r}) into {list(tokens)}, but the index holds {self.token_ids[position]}: "
                    "load the tokenizer saved with the checkpoint.")


__all__ = ["ImageIndex", "checkpoint_file", "index_file_names", "JSON_LIMIT", "INDEX_FILE_NAME",
           "EMBEDDINGS_FILE_NAME", "SCHEMES", "EMBEDDING_SCHEMES"]
