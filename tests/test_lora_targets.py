"""One LoRA-target decision: extraction (the transfer arm) and training (every arm) wrap the
same student modules and skip the same roles for the same reasons."""

from __future__ import annotations

import pytest

from paratransfer.adapter.lora import ADAPTER_NAME, lora_config, lora_targets
from paratransfer.arch import ROLES, arch_for
from paratransfer.arch.ties import TIED_HEAD_REASON, is_tied, untie_head
from paratransfer.demo.tiny import tiny_model
from paratransfer.extract.plan import _plan
from paratransfer.train import lora_targets as training_targets


@pytest.mark.parametrize("student_family", ["llama", "gpt2"])
@pytest.mark.parametrize("roles", [ROLES, ("q", "v", "gate", "head"), ("embed", "head")])
def test_extraction_and_training_wrap_the_same_modules(student_family, roles):
    student = tiny_model(student_family, vocab=40, seed=1)
    s_arch = arch_for(student)
    extracted, standard, skipped = _plan(s_arch, s_arch, student, set(roles))
    trained, train_skipped = training_targets(student, tuple(roles))
    assert [s.path for s in extracted + standard] == [s.path for s in trained]
    assert sorted(map(str, skipped)) == sorted(map(str, train_skipped))
    tied = is_tied(student) and "head" in roles
    assert ({"role": "head", "reason": TIED_HEAD_REASON} in train_skipped) == tied
    assert all("head" not in s.roles for s in trained) or not is_tied(student)


def test_the_config_targets_exactly_the_chosen_modules():
    student = tiny_model("gpt2", vocab=40, seed=1)
    targets = lora_targets(student, ROLES)
    config = lora_config(student, targets.specs, 4, 8.0, 0.0, init_lora_weights=False)
    assert set(config.target_modules) == set(arch_for(student).peft_targets(targets.specs))
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 8.0, False)
    assert config.fan_in_fan_out == any(s.conv1d for s in targets.specs)
    assert ADAPTER_NAME == "default"


def test_an_untied_head_is_a_target_again():
    student = tiny_model("gpt2", vocab=40, seed=1)
    assert is_tied(student) and not any("head" in s.roles for s in
                                        lora_targets(student, ("head",)).specs)
    assert untie_head(student) and not is_tied(student)
    assert [s.roles for s in lora_targets(student, ("head",)).specs] == [("head",)]
    assert not untie_head(student)
