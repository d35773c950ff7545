"""Tied heads: whether a model's lm_head shares the embedding matrix, untying it, and why a tied
head gets no LoRA. Extraction, training, residual init and merge all ask here."""

from __future__ import annotations

import torch

#: Why a tied student's head gets no LoRA (the `skipped` entry of transfer.json / train.json).
TIED_HEAD_REASON = ("the student's lm_head is tied to its embedding: it gets no LoRA and keeps "
                    "its original weight (untied before anything changes the embedding); only "
                    "the input embedding is adapted")


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The plain layer under a PEFT wrapper (the module itself when not wrapped)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def is_tied(model) -> bool:
    """Whether the model's lm_head shares its weight with the input embedding."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return (head is not None and embed is not None
            and base_layer(head).weight is base_layer(embed).weight)


def untie_head(model) -> bool:
    """Give a tied lm_head its own copy of the weight (frozen); True when it was tied.

    Needed before the embedding's base weight is changed (residual init, merge), so that the
    head keeps computing what the original head computed. The config is updated so that nothing
    ties the two again (and a saved model loads untied).
    """
    if not is_tied(model):
        return False
    head = base_layer(model.get_output_embeddings())
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None and text_config is not model.config:
        text_config.tie_word_embeddings = False
    return True
