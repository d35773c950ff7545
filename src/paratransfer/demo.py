"""The built-in demo: an end-to-end extraction on tiny models built offline.

It builds a character tokenizer, a deeper and wider teacher and a smaller student (random
weights, fixed seeds), writes a small seed set of arithmetic questions, computes the teacher's
sensitivity and extracts an adapter for the student, then prints what was selected.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from paratransfer.tiny import char_tokenizer, save_tiny, tiny_model


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """GSM-like chat records: a short word problem and a worked answer."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        records.append({
            "id": f"arith-{i}",
            "messages": [
                {"role": "user", "content": f"Tom has {a} apples and buys {b} more. "
                                            "How many apples does he have?"},
                {"role": "assistant", "content": f"{a} + {b} = {a + b}. So the answer is {a + b}."},
            ],
        })
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_demo(out: str | Path | None = None) -> dict:
    """Build the tiny pair, run sensitivity + extraction, print the summary; return the report."""
    from paratransfer.cli import summarize_extraction
    from paratransfer.extract import ExtractSettings
    from paratransfer.pipeline import SensitivitySettings, run_extract

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="paratransfer-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    teacher_dir = save_tiny(tiny_model("llama", vocab=len(tokenizer), hidden=64, layers=6,
                                       heads=8, kv_heads=4, mlp=160, seed=1),
                            tokenizer, root / "teacher")
    student_dir = save_tiny(tiny_model("llama", vocab=len(tokenizer), hidden=48, layers=4,
                                       heads=6, kv_heads=2, mlp=112, seed=2),
                            tokenizer, root / "student")
    seeds = write_jsonl(root / "seeds.jsonl", arithmetic_records(32))
    print(f"demo: teacher {teacher_dir} (6 layers, 64 wide), student {student_dir} "
          "(4 layers, 48 wide)")
    report = run_extract(str(teacher_dir), str(student_dir), root / "adapter",
                         ExtractSettings(rank=8, alpha=8), seeds=seeds,
                         sens_settings=SensitivitySettings(), overwrite=True)
    print(summarize_extraction(report, root / "adapter"))
    scores = ", ".join(f"{s:.3g}" for s in report["layer_scores"])
    print(f"teacher layer scores: {scores}")
    return report
