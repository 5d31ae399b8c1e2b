"""Image keys <-> identifiers (naive, atomic, semantic, rq), saved beside the weights, with the decoding constraint."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from .atomic_io import atomic_write, atomic_write_text
from .id_trie import IdTrie, TrieConstrainedLogitsProcessor, prefix_allowed_tokens_fn
from .residual_quantization import residual_quantize
from .semantic_ids import hierarchical_kmeans_ids

INDEX_FILE_NAME = "image_index.json"
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


class ImageIndex:
    """The collection a model memorises: for each image key, its identifier string and token ids.

    `token_ids` exclude eos (the trie and `labels_for` add it). Positions (0..N-1) are the index's own ids.
    `embeddings` (N, d), when set, are the indexed images' dense embeddings (the dual encoder's search index);
    they are saved and loaded with the identifiers, so one object owns everything a model searches over.
    """

    def __init__(self, keys: Sequence[str], id_strings: Sequence[str], token_ids: Sequence[Sequence[int]],
                 scheme: str, eos_token_id: int, pad_token_id: int, added_tokens: Sequence[str] = (),
                 embeddings: torch.Tensor | None = None, scheme_info: dict | None = None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme={scheme!r} is not one of {', '.join(SCHEMES)}.")
        if not (len(keys) == len(id_strings) == len(token_ids)):
            raise ValueError("keys, id_strings and token_ids must have one entry per image.")
        self.keys = [str(k) for k in keys]
        self.id_strings = list(id_strings)
        self.token_ids = [list(map(int, t)) for t in token_ids]
        self.scheme = scheme
        self.eos_token_id, self.pad_token_id = int(eos_token_id), int(pad_token_id)
        self.added_tokens = list(added_tokens)
        self.embeddings = embeddings
        self.scheme_info = dict(scheme_info or {})  # how the ids were built (rq: codes, usage, collisions)
        self.code_vectors: dict[int, np.ndarray] = {}  # rq, when just built: token id -> its code's vector
        # where each image's file was when the collection was indexed (see `record_image_paths`)
        self.image_root: str | None = None
        self.image_files: list[str | None] | None = None
        self.position_of_key = {}
        for position, key in enumerate(self.keys):
            if key in self.position_of_key:
                raise ValueError(f"Duplicate image key {key!r} in the image index.")
            self.position_of_key[key] = position
        self.position_of_tokens = {}
        for position, tokens in enumerate(self.token_ids):
            previous = self.position_of_tokens.setdefault(tuple(tokens), position)
            if previous != position:
                raise ValueError(
                    f"Images {self.keys[previous]!r} and {self.keys[position]!r} got the same identifier tokens "
                    f"{tokens} (ids {self.id_strings[previous]!r}, {self.id_strings[position]!r}): the tokenizer "
                    "cannot tell these identifiers apart.")

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
        return len(self.keys)

    @property
    def max_token_id(self) -> int:
        return max(max(t) for t in self.token_ids)

    @property
    def max_id_length(self) -> int:
        """Longest identifier in tokens, eos included."""
        return max(len(t) for t in self.token_ids) + 1

    def labels_for(self, key: str) -> list[int]:
        return self.token_ids[self.position_of_key[str(key)]] + [self.eos_token_id]

    def decode(self, sequences: torch.Tensor | np.ndarray, num_start_tokens: int = 1) -> np.ndarray:
        """Index position of each generated row (start token first); -1 for anything that is not an identifier."""
        sequences = np.asarray(sequences.cpu() if isinstance(sequences, torch.Tensor) else sequences)
        positions = np.full(len(sequences), -1, dtype=np.int64)
        for row, tokens in enumerate(sequences[:, num_start_tokens:].tolist()):
            positions[row] = self.position_of_label(tokens)
        return positions

    def position_of_label(self, tokens: Sequence[int]) -> int:
        """Position of a token row that must end with eos (then pad / -100 / nothing); -1 otherwise."""
        tokens = list(tokens)
        if self.eos_token_id not in tokens:
            return -1
        end = tokens.index(self.eos_token_id)
        if any(t not in (self.pad_token_id, -100, self.eos_token_id) for t in tokens[end + 1:]):
            return -1
        return self.position_of_tokens.get(tuple(tokens[:end]), -1)

    def embeddings_for(self, keys: Sequence[str]) -> torch.Tensor:
        """This index's embeddings in the order of `keys` (another index's images); a ValueError names the keys
        it has no embedding for."""
        if self.embeddings is None:
            raise ValueError(f"This image index has no embeddings ({EMBEDDINGS_FILE_NAME}).")
        missing = [key for key in keys if key not in self.position_of_key]
        if missing:
            raise ValueError(f"no embedding for {len(missing)} of the {len(keys)} indexed images (e.g. {missing[:3]})")
        return self.embeddings[torch.as_tensor([self.position_of_key[key] for key in keys], dtype=torch.long)]

    def identifier_only_token_ids(self, caption_token_ids) -> list[int]:
        """Tokens that identifiers use and no caption does (`caption_token_ids`: the tokenized training captions):
        what a caption must never contain, so the caption decoder cannot write an identifier."""
        in_captions = {int(t) for ids in caption_token_ids for t in ids}
        return sorted({t for ids in self.token_ids for t in ids} - in_captions)

    # ----- the decoding constraint -----------------------------------------------------------------
    @cached_property
    def trie(self) -> IdTrie:
        return IdTrie(self.token_ids, self.eos_token_id, self.pad_token_id)

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
        """The identifiers as JSON-able data (embeddings travel separately, as tensors)."""
        return {"scheme": self.scheme, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                "added_tokens": self.added_tokens, "scheme_info": self.scheme_info, "keys": self.keys,
                "id_strings": self.id_strings, "token_ids": self.token_ids,
                **({"image_root": self.image_root, "image_files": self.image_files} if self.image_files else {})}

    def save(self, directory: str | os.PathLike) -> str:
        """Write `image_index.json` (and `image_embeddings.safetensors` when there are embeddings) atomically:
        a crash never leaves half an index. A stale embeddings file from an earlier save is removed."""
        embeddings_path = os.path.join(directory, EMBEDDINGS_FILE_NAME)
        if self.embeddings is not None:
            from safetensors.torch import save_file

            tensor = self.embeddings.detach().float().cpu().contiguous()
            if len(tensor) != len(self):
                raise ValueError(f"ImageIndex.embeddings has {len(tensor)} rows for {len(self)} images.")
            atomic_write(embeddings_path, lambda tmp: save_file({"image_embeddings": tensor}, tmp))
        elif os.path.exists(embeddings_path):
            os.unlink(embeddings_path)
        return atomic_write_text(os.path.join(directory, INDEX_FILE_NAME), json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict, source: str = "image index", embeddings: torch.Tensor | None = None
                  ) -> "ImageIndex":
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
    def load(cls, path: str | os.PathLike, embeddings_path: str | os.PathLike | None = None) -> "ImageIndex":
        """From `image_index.json` (or the directory holding it); a corrupt file is an error naming it."""
        path = os.path.join(path, INDEX_FILE_NAME) if os.path.isdir(path) else os.fspath(path)
        if embeddings_path is None and os.path.exists(os.path.join(os.path.dirname(path), EMBEDDINGS_FILE_NAME)):
            embeddings_path = os.path.join(os.path.dirname(path), EMBEDDINGS_FILE_NAME)
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: the image index is not valid JSON ({err}).") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the image index is not a JSON object.")
        embeddings = None
        if embeddings_path is not None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                embeddings = load_file(embeddings_path)["image_embeddings"]
            except (SafetensorError, KeyError, OSError) as err:
                raise ValueError(f"{embeddings_path}: unreadable image embeddings ({err}).") from err
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
        return cls.load(index_path, checkpoint_file(name_or_path, EMBEDDINGS_FILE_NAME, **options))

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


__all__ = ["ImageIndex", "checkpoint_file", "INDEX_FILE_NAME", "EMBEDDINGS_FILE_NAME", "SCHEMES",
           "EMBEDDING_SCHEMES"]
