"""A teacher's weights read lazily from its safetensors files: one tensor at a time, by name.

`SafetensorsWeights` implements `paratransfer.teacher.weights.TeacherWeights` (`config`, `w[name]`,
`name in w`, `w.keys()`) like `ModelWeights` does for a model in memory, so extraction and
layer-streamed sensitivity can work on a teacher far bigger than memory.

Names are the model's own parameter names (`named_parameters()` of the model transformers
builds from the config), not the checkpoint's: transformers 5.x renames some checkpoint keys on
load (legacy names, a missing or extra base-model prefix, e.g. GPT-NeoX `embed_out` ->
`lm_head`), and the same renaming is applied here. A tied head (`lm_head.weight` when the config
ties it to the embedding) resolves to the embedding's tensor.

Every read opens the shard, copies the tensor out and closes the file again, so no shard stays
memory-mapped (a long-lived mapping would count every page read so far as resident memory).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch

from paratransfer.io.errors import UserError
from paratransfer.io.readers import safetensors_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def local_folder(name_or_path: str | Path) -> Path | None:
    """The local folder holding a model: the path itself, or the hub cache's snapshot (offline).

    None when the model is neither a folder nor already in the local hub cache. A `.gguf`
    file is its converted folder (`teacher/gguf.py`).
    """
    from paratransfer.teacher.gguf import converted_folder, is_gguf

    if is_gguf(name_or_path):
        return converted_folder(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") > 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not cached, not a repo id, hub library errors: no local copy
        return None


def has_safetensors(name_or_path: str | Path) -> bool:
    """Whether the model is a local folder (or cached hub snapshot) with safetensors weights."""
    folder = local_folder(name_or_path)
    return folder is not None and ((folder / SINGLE_FILE).is_file()
                                   or (folder / INDEX_FILE).is_file())


def meta_model(config, dtype: torch.dtype | None = None):
    """The causal LM transformers builds from `config`, with every parameter on the meta device.

    Buffers (rotary frequencies) stay real, computed as `from_pretrained` computes them; tied
    weights are tied. Costs no memory for the weights.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            kwargs = {"dtype": dtype} if dtype is not None else {}
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot build a causal LM from config {config.model_type!r} ({first})") from e
    model.tie_weights()
    model.eval()
    return model


def _key_renamer(model):
    """checkpoint key -> (model key, whether a fusing/splitting converter claims it)."""
    state = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    prefix = getattr(model, "base_model_prefix", None)
    try:  # transformers 5.x's own rules (an internal API: fall back to names as stored)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except Exception:  # pragma: no cover - older/newer transformers without these helpers
        rename_source_key, renamings, converters = None, [], []

    def rename(key: str) -> tuple[str, bool]:
        if rename_source_key is None:
            return key, False
        new, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if new not in state and key in state:  # as transformers does: keep it, fix the prefix
            new, pattern = rename_source_key(key, [], [], prefix, state)
        return new, pattern is not None

    return rename


class SafetensorsWeights:
    """A teacher's parameters, read one tensor at a time from its (sharded) safetensors files.

    `teacher` is a local folder (or a hub id already in the local cache) with `model.safetensors`
    or `model.safetensors.index.json`. `keys()` lists each parameter once (`named_parameters()`
    names); `w[name]` and `name in w` also take tied aliases. Tensors come in their stored
    orientation, in `dtype` when given, else as stored; each access reads the file again.
    """

    def __init__(self, teacher: str | Path, dtype: torch.dtype | None = None):
        from transformers import AutoConfig

        self.name = str(teacher)
        folder = local_folder(teacher)
        if folder is None:
            raise UserError(f"{teacher}: not a local model folder (reading weights lazily needs "
                            "the safetensors files on disk)")
        self.folder = folder
        self.dtype = dtype
        try:
            self.config = AutoConfig.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{teacher}: cannot read the model config ({first})") from e
        self._files = self._shard_map()  # checkpoint key -> shard file
        self._entries = self._read_headers()  # checkpoint key -> (dtype name, shape)
        self._match_names()

    # ------------------------------------------------------------------ discovery

    def _shard_map(self) -> dict[str, Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index}: not a safetensors index (no 'weight_map')") from e
            return {k: self.folder / v for k, v in weight_map.items()}
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            raise UserError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                            "checkpoints can be read lazily)")
        return dict.fromkeys((k for k in safetensors_header(single) if k != "__metadata__"), single)

    def _read_headers(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for path in sorted(set(self._files.values())):
            if not path.is_file():
                raise UserError(f"{path}: listed in {INDEX_FILE} but missing")
            header = safetensors_header(path)
            for key, entry in header.items():
                if key != "__metadata__" and self._files.get(key) == path:
                    out[key] = (entry["dtype"], tuple(entry["shape"]))
        missing = [k for k in self._files if k not in out]
        if missing:
            raise UserError(f"{self.folder}: {len(missing)} tensors listed in the index are not in "
                            f"their shard (e.g. {missing[0]!r})")
        return out

    def _match_names(self) -> None:
        """Map every model parameter name to the checkpoint key that holds it."""
        model = self.skeleton
        rename = _key_renamer(model)
        params = dict(model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}
        self._canonical: dict[str, str] = {}
        for name, p in params.items():
            self._canonical[name] = first.setdefault(id(p), name)
        by_model_name: dict[str, str] = {}
        converted: list[str] = []
        for key in self._entries:
            new, needs_conversion = rename(key)
            if new in params:
                if needs_conversion:
                    converted.append(key)
                else:
                    by_model_name.setdefault(new, key)
        # Tied parameters: any stored alias will do (a tied head is usually not stored).
        source: dict[str, str] = {}
        for name, canon in self._canonical.items():
            key = by_model_name.get(name)
            if key is not None:
                source.setdefault(canon, key)
        missing = [n for n in first.values() if n not in source]
        if missing:
            unused = sorted(set(self._entries) - set(source.values()))
            hint = (f"; checkpoint keys not matched: {', '.join(unused[:5])}"
                    f"{' ...' if len(unused) > 5 else ''}") if unused else ""
            why = (f" ({len(converted)} checkpoint tensors need fusing/splitting on load, which "
                   "lazy reading does not do)") if converted else ""
            raise UserError(f"{self.folder}: cannot match {len(missing)} parameters of the "
                            f"{self.config.model_type} model to checkpoint tensors (e.g. "
                            f"{missing[0]!r}){why}{hint}")
        for canon, key in source.items():
            want = tuple(params[canon].shape)
            have = self._entries[key][1]
            if want != have:
                raise UserError(f"{self.folder}: checkpoint tensor {key!r} has shape {list(have)}, "
                                f"but the config gives {canon!r} the shape {list(want)}")
        self._source = source

    @cached_property
    def skeleton(self):
        """The model built from the config on the meta device (names, shapes, module classes)."""
        return meta_model(self.config, self.dtype)

    # ------------------------------------------------------------------ the interface

    def keys(self) -> list[str]:
        """Each parameter once, as `named_parameters()` names it (and sensitivity files do)."""
        return list(dict.fromkeys(self._canonical.values()))

    def canonical_names(self) -> dict[str, str]:
        """Every parameter name (aliases included) -> the name `named_parameters()` keeps."""
        return dict(self._canonical)

    def __contains__(self, name: object) -> bool:
        return name in self._canonical

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._source)

    def checkpoint_key(self, name: str) -> str:
        """The key under which the checkpoint stores parameter `name` (aliases resolved)."""
        if name not in self._canonical:
            raise KeyError(name)
        return self._source[self._canonical[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[self.checkpoint_key(name)][1]

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = self.checkpoint_key(name)
        with safe_open(str(self._files[key]), framework="pt") as f:
            tensor = f.get_tensor(key)
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def head(self, name: str, n: int = 8) -> torch.Tensor:
        """The first `n` values of the flattened tensor, reading only the rows that hold them."""
        from safetensors import safe_open

        key = self.checkpoint_key(name)
        shape = self.shape(name)
        with safe_open(str(self._files[key]), framework="pt") as f:
            part = f.get_slice(key)
            if len(shape) == 0:
                values = f.get_tensor(key).reshape(1)
            else:
                row = math.prod(shape[1:])
                rows = min(shape[0], max(1, math.ceil(n / max(row, 1))))
                values = part[:rows].reshape(-1)
        return values[:n]

    def __repr__(self) -> str:
        return f"SafetensorsWeights({self.name!r}, {len(self._source)} tensors)"
