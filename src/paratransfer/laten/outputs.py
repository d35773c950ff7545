"""What `paratransfer laten` writes, all at once into a temporary folder renamed into place:

- `adapter_config.json` + `adapter_model.safetensors`: a PEFT LoRA (scale 1, no dropout) whose
  B·A is exactly the injection, for the unmodified student (`evaluate --adapter`, `merge`);
- `translator.safetensors`: the trained translator's weights;
- `laten.json`: settings, located layers and neurons, the loss curve, provenance; the
  wall-clock time under `timing`, apart from everything else.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

LATEN_JSON = "laten.json"
TRANSLATOR_FILE = "translator.safetensors"


def write_outputs(out: Path, overwrite: bool, student: torch.nn.Module, student_id: str,
                  factors, rank: int, translator: torch.nn.Module, report: dict,
                  seeds: str | Path, data: str | Path | None, started: float) -> None:
    """Write the folder (the student gets wrapped by PEFT on the way: pass a copy you don't need)."""
    from safetensors.torch import save_file

    from paratransfer import __version__
    from paratransfer.adapter import write_adapter
    from paratransfer.io.outputs import atomic_dir, output_lock, write_json
    from paratransfer.tasks.examples import file_digest

    report["seeds_sha256"] = file_digest(seeds)
    report["data_sha256"] = file_digest(data) if data is not None else None
    report["paratransfer_version"] = __version__
    with output_lock(out), atomic_dir(out, overwrite) as tmp:
        write_adapter(student, factors, tmp, rank, float(rank), 0.0, student_id)
        save_file({k: v.detach().cpu().contiguous() for k, v in translator.state_dict().items()},
                  str(tmp / TRANSLATOR_FILE), metadata={"paratransfer_laten": "1"})
        report["timing"] = {"seconds": round(time.time() - started, 3)}
        write_json(tmp / LATEN_JSON, report)
