"""The one LoRA-target decision, shared by extraction and training.

Which student modules get LoRA for the wanted roles, which are skipped and why, the adapter's
name and the `LoraConfig` itself live here only: the transfer arm (extracted factors) and the
baseline arms (trained from PEFT's init) must wrap exactly the same modules the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from paratransfer.arch import ArchSpec, ModuleSpec, arch_for
from paratransfer.arch.ties import TIED_HEAD_REASON, is_tied

#: The PEFT adapter name of every adapter paratransfer writes or trains.
ADAPTER_NAME = "default"


class Targets(NamedTuple):
    """The student modules to wrap for some roles, and the wanted roles that get no LoRA."""

    specs: list[ModuleSpec]
    missing: list[dict]     # roles the student's family does not have
    tied_head: list[dict]   # the head, when it shares the embedding matrix


def lora_targets(student, roles: Iterable[str], arch: ArchSpec | None = None) -> Targets:
    """The modules holding `roles` in the student, minus a tied head (it keeps its own weight)."""
    arch = arch or arch_for(student)
    roles = set(roles)
    missing = [{"role": role, "reason": f"the {arch.family} family has no {role}"}
               for role in sorted(roles - arch.roles())]
    specs, tied = [], []
    for spec in arch.modules_for(roles):
        if spec.roles == ("head",) and is_tied(student):
            tied.append({"role": "head", "reason": TIED_HEAD_REASON})
            continue
        specs.append(spec)
    return Targets(specs, missing, tied)


def lora_config(student, specs: Sequence[ModuleSpec], rank: int, alpha: float, dropout: float,
                **peft_options):
    """The `LoraConfig` wrapping exactly `specs`; `peft_options` adds e.g. the init or base id.

    The base id is the one `get_peft_model` will write anyway: the loaded student's
    `name_or_path` when it has one (a `.gguf` student loads from its converted folder, and PEFT
    warns when the config names something else), else the id given."""
    from peft import LoraConfig

    loaded = getattr(student, "name_or_path", None)
    if loaded and "base_model_name_or_path" in peft_options:
        peft_options = {**peft_options, "base_model_name_or_path": loaded}
    specs = list(dict.fromkeys(specs))
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=arch_for(student).peft_targets(specs),
                      fan_in_fan_out=any(s.conv1d for s in specs), bias="none",
                      task_type="CAUSAL_LM", **peft_options)
