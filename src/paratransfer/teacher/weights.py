"""Where extraction reads the teacher's weights from: one named matrix at a time.

`extract` never walks the teacher's modules: it asks a `TeacherWeights` source for the config,
the parameter names and one tensor at a time. `ModelWeights` serves a model in memory; a lazy
source (reading a safetensors checkpoint tensor by tensor, for teachers larger than memory)
implements the same four members and is passed in its place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TeacherWeights(Protocol):
    """A teacher's parameters by state-dict name, read one tensor at a time.

    `keys()` lists each stored parameter once (the names `named_parameters()` gives, which are
    the names sensitivity files use); `name in source` and `source[name]` also accept tied
    aliases (GPT-2's `lm_head.weight` -> `transformer.wte.weight`). Tensors come in their stored
    orientation (Conv1D `[in, out]`, embeddings `[vocab, d]`) and are not to be modified.
    """

    config: Any

    def __getitem__(self, name: str) -> torch.Tensor: ...

    def __contains__(self, name: object) -> bool: ...

    def keys(self) -> Iterable[str]: ...


class ModelWeights:
    """`TeacherWeights` for a model in memory (tensors are detached views, no copies)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config
        self._params = dict(model.named_parameters(remove_duplicate=False))
        self._keys = [name for name, _ in model.named_parameters()]

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._params[name].detach()
        except KeyError:
            raise KeyError(f"the teacher has no parameter {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def keys(self) -> list[str]:
        return list(self._keys)


def as_teacher_weights(teacher: torch.nn.Module | TeacherWeights) -> TeacherWeights:
    """A module is wrapped in `ModelWeights`; a weights source is used as it is."""
    if isinstance(teacher, torch.nn.Module):
        return ModelWeights(teacher)
    missing = [m for m in ("config", "__getitem__", "__contains__", "keys") if not hasattr(teacher, m)]
    if missing:
        raise TypeError(f"teacher must be an nn.Module or a TeacherWeights source "
                        f"({type(teacher).__name__} lacks {', '.join(missing)})")
    return teacher
