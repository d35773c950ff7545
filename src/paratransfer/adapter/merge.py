"""`paratransfer merge`: student + LoRA adapter -> a standalone model folder.

The result (safetensors weights, config, tokenizer) loads with
`AutoModelForCausalLM.from_pretrained` alone, for evaluation or serving by any tool.

A tied student (GPT-2) whose adapter changes the embedding (or the head) is untied first:
PEFT's embedding LoRA changes the input embedding only, while merging it into a weight shared
with the head would change the head too. The merged model keeps its own head and says so in
its config (`tie_word_embeddings: false`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from paratransfer.io.errors import UserError
from paratransfer.io.outputs import atomic_dir, check_output_path, write_json
from paratransfer.io.threads import runtime


def _load_raw_tokenizer(name_or_path: str):
    """The student's tokenizer exactly as stored (no pad token added), to ship with the model."""
    from transformers import AutoTokenizer

    from paratransfer.teacher.models import load_tokenizer

    load_tokenizer(name_or_path)  # one-line errors for a missing folder or tokenizer
    from paratransfer.teacher.gguf import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(str(name_or_path)))


def _adapter_touches_shared_weight(student, adapter) -> bool:
    """Whether the adapter wraps the input embedding or the head of a tied student."""
    from paratransfer.adapter.inject import is_tied, model_key, module_of, saved_base_weight

    if not is_tied(student):
        return False
    names = {id(m): n for n, m in student.named_modules()}
    shared = {names.get(id(student.get_input_embeddings())),
              names.get(id(student.get_output_embeddings()))}
    modules = {module_of(k.removesuffix(".base_layer.weight")) if saved_base_weight(k)
               else module_of(model_key(k)) for k in adapter.tensors}
    return bool(modules & shared)


def merged_model(student_id: str, adapter_dir: str | Path, dtype: torch.dtype | None = None):
    """The student with the adapter merged in (computed in fp32), in `dtype` (default: the
    student's stored dtype); returns (model, info)."""
    from peft import PeftModel

    from paratransfer.adapter.inject import check_adapter_shapes, read_adapter, untie_head
    from paratransfer.teacher.models import load_model, model_label

    adapter = read_adapter(adapter_dir)
    student = load_model(student_id, dtype="auto", device="cpu")
    stored = next(student.parameters()).dtype
    student = student.float()
    check_adapter_shapes(student, adapter)
    untied = untie_head(student) if _adapter_touches_shared_weight(student, adapter) else False
    try:
        model = PeftModel.from_pretrained(student, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{adapter_dir}: cannot apply the adapter to {student_id} ({first})") from e
    out_dtype = dtype or stored
    model = model.to(out_dtype)
    model.config.dtype = out_dtype
    model.eval()
    from paratransfer.teacher.gguf import gguf_provenance

    info = {"student": model_label(student_id), **gguf_provenance("student", student_id),
            "adapter": str(Path(adapter_dir).resolve()),
            "rank": adapter.rank, "alpha": adapter.alpha, "dtype": str(out_dtype).removeprefix("torch."),
            "untied_head": untied, "runtime": runtime()}
    return model, info


def run_merge(student_id: str, adapter_dir: str | Path, out: str | Path,
              dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """`paratransfer merge`: write the merged model, its config and the student's tokenizer."""
    out = check_output_path(out, overwrite, [student_id, adapter_dir])
    tokenizer = _load_raw_tokenizer(student_id)
    model, info = merged_model(student_id, adapter_dir, dtype)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "merge.json", info)
    return info
