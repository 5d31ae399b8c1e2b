"""How an image index is stored: one JSON file for small collections, a JSON header plus a safetensors file of
columns above `JSON_LIMIT` images, and the indexed images' embeddings beside them; read back without a Python loop
per image, locally or from the Hub. `ImageIndex` inherits these methods."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
import torch

from .checkpoint_io import (ARRAYS_FILE_PREFIX, ARRAYS_FILE_SUFFIX, CODEBOOKS_FILE_NAME, EMBEDDINGS_FILE_NAME,
                            INDEX_FILE_NAME, atomic_write, atomic_write_text)
from .id_trie import packed_sort_keys
from .index_arrays import IdStrings, KeyColumn, StringColumn, TokenTable

INDEX_FORMAT, INDEX_FORMAT_VERSION = "vit-t5-dsi image index", 2
# Up to this many images an index is saved as one JSON file of lists (the first layout: readable, and loadable by
# older code); above it, as a small JSON header plus a safetensors file of columns (~30 bytes per image).
JSON_LIMIT = 10_000
# what `from_pretrained` passes on to the Hub download of the index, like transformers' own loaders
HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download")


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
    (`image_index-<digest>.safetensors`, stale ones included), `image_embeddings.safetensors` and
    `rq_codebooks.safetensors`. For code that
    clears or checks a model's state (their names are not all fixed)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory)
                  if name in (INDEX_FILE_NAME, EMBEDDINGS_FILE_NAME, CODEBOOKS_FILE_NAME)
                  or (name.startswith(ARRAYS_FILE_PREFIX) and name.endswith(ARRAYS_FILE_SUFFIX)))


def check_row_order(columns: Sequence[np.ndarray], order: np.ndarray, source: str) -> None:
    """`order` is a permutation that sorts the rows strictly (so rows are also distinct); a ValueError if not."""
    n = len(order)
    if n and (int(order.min()) < 0 or int(order.max()) >= n):
        raise ValueError(f"{source}: the identifier order is not a permutation of the images.")
    seen = np.zeros(n, dtype=bool)
    seen[order] = True
    if not bool(seen.all()):
        raise ValueError(f"{source}: the identifier order is not a permutation of the images.")
    key = packed_sort_keys(columns)
    if key is not None:
        ordered = key[order]
        increasing = bool((ordered[1:] > ordered[:-1]).all())
    else:
        less = np.zeros(max(n - 1, 0), dtype=bool)
        decided = np.zeros(max(n - 1, 0), dtype=bool)
        for column in columns:
            a, b = column[order[:-1]], column[order[1:]]
            less |= ~decided & (a < b)
            decided |= a != b
        increasing = bool(less.all())
    if not increasing:
        raise ValueError(f"{source}: two images share identifier tokens, or the identifier order is not sorted.")


class ImageIndexFiles:
    """Saving and loading of `ImageIndex` (a mixin: the index's columns are set up by `ImageIndex._setup`)."""

    def to_dict(self) -> dict:
        """The identifiers as JSON-able data, today's and the first layout of `image_index.json` (embeddings
        travel separately, as tensors). Builds Python lists of everything: for small indexes and messages."""
        return {"scheme": self.scheme, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                "added_tokens": self.added_tokens, "scheme_info": self.scheme_info, "keys": list(self.keys),
                "id_strings": list(self.id_strings), "token_ids": list(self.token_ids),
                **({"image_root": self.image_root, "image_files": list(self.image_files)}
                   if self.image_files is not None else {}),
                **({"retired": self.retired} if self.retired["id_strings"] else {})}

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
        self._save_codebooks(directory)
        arrays_name = self._save_columns(directory) if columns else None
        text = json.dumps(self._header(arrays_name) if columns else self.to_dict())
        path = atomic_write_text(os.path.join(directory, INDEX_FILE_NAME), text)
        for name in os.listdir(directory):
            if name.startswith(ARRAYS_FILE_PREFIX) and name.endswith(ARRAYS_FILE_SUFFIX) and name != arrays_name:
                os.unlink(os.path.join(directory, name))
        return path

    def _save_codebooks(self, directory: str) -> None:
        path = os.path.join(directory, CODEBOOKS_FILE_NAME)
        if not self.codebooks:
            if os.path.exists(path):
                os.unlink(path)
            return
        from safetensors.numpy import save_file

        tensors = {f"level_{i}": np.ascontiguousarray(c, dtype=np.float32) for i, c in enumerate(self.codebooks)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"levels": str(len(tensors))}))

    @staticmethod
    def _read_codebooks(path: str | None) -> list[np.ndarray] | None:
        if path is None:
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="np") as f:
                count = int((f.metadata() or {})["levels"])
                return [f.get_tensor(f"level_{i}") for i in range(count)]
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: unreadable rq codebooks ({err}).") from err

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
                **({"image_root": self.image_root} if self.image_files is not None else {}),
                **({"retired": self.retired} if self.retired["id_strings"] else {})}

    @classmethod
    def from_dict(cls, data: dict, source: str = "image index", embeddings: torch.Tensor | None = None
                  ) -> "ImageIndexFiles":
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
        index._set_retired(data.get("retired"), source)
        return index

    @classmethod
    def from_arrays(cls, header: dict, arrays_path: str | os.PathLike, source: str = "image index",
                    embeddings: torch.Tensor | None = None) -> "ImageIndexFiles":
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
        index._set_retired(header.get("retired"), source)
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

    def _set_retired(self, retired, source: str) -> None:
        if retired is None:
            return
        if not (isinstance(retired, dict) and isinstance(retired.get("id_strings"), list)
                and isinstance(retired.get("token_ids"), list)
                and len(retired["id_strings"]) == len(retired["token_ids"])):
            raise ValueError(f"{source}: 'retired' must hold id_strings and token_ids, one per removed image.")
        self.retired = {"id_strings": [str(s) for s in retired["id_strings"]],
                        "token_ids": [[int(t) for t in row] for row in retired["token_ids"]]}

    @classmethod
    def load(cls, path: str | os.PathLike, embeddings_path: str | os.PathLike | None = None,
             arrays_path: str | os.PathLike | None = None, codebooks_path: str | os.PathLike | None = None
             ) -> "ImageIndexFiles":
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
        if codebooks_path is None and os.path.exists(os.path.join(os.path.dirname(path), CODEBOOKS_FILE_NAME)):
            codebooks_path = os.path.join(os.path.dirname(path), CODEBOOKS_FILE_NAME)
        index.codebooks = cls._read_codebooks(codebooks_path)
        return index

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs) -> "ImageIndexFiles | None":
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
        # the rq codebooks serve only adding images, which works on a local folder: a Hub load never asks for
        # them (one request fewer, and a repo pushed before they existed still loads offline from the cache)
        codebooks = (checkpoint_file(name_or_path, CODEBOOKS_FILE_NAME, **options)
                     if os.path.isdir(name_or_path) else None)
        return cls.load(index_path, checkpoint_file(name_or_path, EMBEDDINGS_FILE_NAME, **options), arrays_path,
                        codebooks)


__all__ = ["ImageIndexFiles", "checkpoint_file", "index_file_names", "INDEX_FILE_NAME", "EMBEDDINGS_FILE_NAME",
           "CODEBOOKS_FILE_NAME",
           "JSON_LIMIT", "HUB_KWARGS"]
