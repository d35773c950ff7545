"""Shared fixtures: tiny random teacher/student pairs saved offline, and seed sets."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process CLI calls apply their thread default to the whole test process: keep it at one.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI stays reproducible); set
# HYPOTHESIS_PROFILE=explore to draw new ones while developing.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from paratransfer.demo.tiny import char_tokenizer, save_tiny, tiny_model  # noqa: E402
from paratransfer.demo.world import arithmetic_records, write_jsonl  # noqa: E402

# Tiny models gain nothing from threads, and on a busy 2-core machine two threads thrash.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

#: Teacher deeper and wider than the student; k/v narrower than q (grouped-query attention).
PAIRS = {
    "llama": (dict(hidden=48, layers=4, heads=6, kv_heads=2, mlp=96),
              dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64)),
    "qwen2": (dict(hidden=48, layers=3, heads=6, kv_heads=3, mlp=80),
              dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64)),
    "gpt2": (dict(hidden=48, layers=4, heads=6, mlp=96),
             dict(hidden=32, layers=2, heads=4, mlp=64)),
}


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def seeds_file(tmp_path_factory) -> Path:
    """Five GSM-like chat records (an odd count, so later data-parallel splits are unequal)."""
    return write_jsonl(tmp_path_factory.mktemp("seeds") / "seeds.jsonl", arithmetic_records(5))


#: LoRA rank and alpha of the shared test adapters (`adapters`).
ADAPTER_RANK, ADAPTER_ALPHA = 4, 8.0


@pytest.fixture(scope="session")
def model_pairs(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, Path]]:
    """family -> (teacher folder, student folder), built once per session."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, (family, (t_kw, s_kw)) in enumerate(PAIRS.items()):
        teacher = tiny_model(family, vocab=len(tokenizer), seed=10 + i, **t_kw)
        student = tiny_model(family, vocab=len(tokenizer), seed=20 + i, **s_kw)
        out[family] = (save_tiny(teacher, tokenizer, root / f"{family}-teacher"),
                       save_tiny(student, tokenizer, root / f"{family}-student"))
    return out


@pytest.fixture(scope="session")
def adapters(model_pairs, seeds_file, tmp_path_factory) -> dict[str, Path]:
    """family -> adapter folder extracted from the tiny teacher for the tiny student
    (rank ADAPTER_RANK, alpha ADAPTER_ALPHA), built once per session."""
    from paratransfer.extract.plan import ExtractSettings
    from paratransfer.extract.step import run_extract

    out = {}
    for family, (teacher, student) in model_pairs.items():
        folder = tmp_path_factory.mktemp(f"adapter-{family}") / "adapter"
        run_extract(str(teacher), str(student), folder,
                    ExtractSettings(rank=ADAPTER_RANK, alpha=ADAPTER_ALPHA), seeds=seeds_file,
                    progress=False)
        out[family] = folder
    return out


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the project's shared data folder is not beside the repo)")
    return path
