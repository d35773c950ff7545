"""How stable is what gets transferred? The method's choices on random subsets of a seed pool.

`paratransfer stability` asks: had the seed set been another k examples of the same task, would
the same teacher layers, the same window of every matrix and the same rank-r factor subspaces
have been chosen? Each draw of k samples is compared with the choice made from the whole pool.

Sensitivity is a sum over samples (docs/method.md §1), so a subset's sensitivity is the sum of
its samples' |θ ⊙ g|. Every pool sample gets exactly one forward+backward (the hooks of
`sensitivity.py`, into one set of fp32 accumulators zeroed between samples), and its |θ ⊙ g| is
written to disk as an ordinary sensitivity file. A draw's sensitivity is a lazy mapping that,
for the one parameter extraction asks for, adds that parameter up over the draw's files
(float64, then fp32, like any sensitivity file). `extract.extract` then runs unchanged on the
draw: layer selection, the window of every module (with role splits, vocabulary gathering,
grouped-query shapes, head units, padding) and the rank-r factors are exactly what
`paratransfer extract` would choose from those seeds, with nothing of it re-implemented here.

Why per-sample files rather than a smaller reduced form: per-layer scalars suffice for the
layers but not for windows; window-score maps are linear too, but what they are depends on
everything extraction does before the window search (which role part of which matrix, gathered
into which vocabulary, at which block size), so keeping them would duplicate that plan; chunk
partial sums would restrict draws to unions of chunks. The price is disk, not memory:

* memory: the teacher, one set of accumulators during the pass (one sensitivity file's worth),
  then one parameter's float64 sum at a time plus extraction's one-matrix working set; none of
  it grows with the pool or the seed-set size (bench/bench_stability.py measures it);
* disk: pool size x one sensitivity file (4 bytes per teacher parameter per sample), checked
  before the pass, in `work_dir` or inside the output's temporary folder, deleted at the end;
* time: one backward per pool sample, then per draw k file reads of every parameter (layer
  scores) and again of the selected layers' matrices (windows).

What a draw is compared on (Jaccard, window IoU, subspace similarity, chance levels) is in
`stability_figures.py`; the report files are written by `stability_report.py`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paratransfer.checks import whole_number
from paratransfer.errors import UserError

#: Seed-set sizes drawn when none are given (those below the pool size).
DEFAULT_SIZES = (8, 16, 32, 64)
DEFAULT_DRAWS = 20
#: Reductions whose choice is a window, so that window IoU is defined.
WINDOW_REDUCTIONS = ("window", "window-heads")
RECIPE_KEYS = ("sizes", "draws", "seed")


@dataclass(frozen=True)
class StabilitySettings:
    """Which seed-set sizes to draw, how many draws per size, and the seed of the draws."""

    sizes: tuple[int, ...] | None = None  # None: DEFAULT_SIZES below the pool size
    draws: int = DEFAULT_DRAWS
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "draws", whole_number("--draws", self.draws, 1))
        object.__setattr__(self, "seed", whole_number("--seed", self.seed))
        if self.sizes is not None:
            sizes = tuple(whole_number("--sizes", k, 1) for k in self.sizes)
            if not sizes:
                raise UserError("--sizes: expected at least one seed-set size")
            if len(set(sizes)) != len(sizes):
                raise UserError(f"--sizes: a size is repeated ({', '.join(map(str, sizes))})")
            object.__setattr__(self, "sizes", tuple(sorted(sizes)))

    def sizes_for(self, pool: int) -> tuple[int, ...]:
        """The sizes to draw from a pool of `pool` usable samples (UserError if one is larger)."""
        if self.sizes is None:
            return tuple(k for k in DEFAULT_SIZES if k < pool) or (max(1, pool // 2),)
        if self.sizes[-1] > pool:
            raise UserError(f"--sizes: {self.sizes[-1]} is larger than the pool ({pool} seed "
                            "samples with an answer to score)")
        return self.sizes

    @classmethod
    def from_recipe(cls, raw: Any) -> StabilitySettings:
        """From a recipe's `stability: {sizes: [...], draws: N, seed: S}` mapping."""
        if not isinstance(raw, dict):
            raise UserError("stability: expected a mapping with sizes and draws (and seed)")
        unknown = sorted(set(raw) - set(RECIPE_KEYS))
        if unknown:
            raise UserError(f"stability.{unknown[0]}: unknown key (expected one of: "
                            f"{', '.join(RECIPE_KEYS)})")
        sizes = raw.get("sizes")
        if sizes is not None and not isinstance(sizes, list):
            raise UserError(f"stability.sizes: expected a list of seed-set sizes (got {sizes!r})")
        try:
            return cls(tuple(sizes) if sizes is not None else None,
                       raw.get("draws", DEFAULT_DRAWS), raw.get("seed", 0))
        except UserError as e:
            raise UserError(f"stability: {e}") from None


def parse_sizes(text: str | None) -> tuple[int, ...] | None:
    """`"8,16,32"` -> (8, 16, 32); None stays None (the defaults)."""
    if text is None:
        return None
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated whole numbers (got {text!r})") from None


def check_extract_settings(settings) -> None:
    """Stability is about the method's own choices: sensitivity layers and a window."""
    if settings.layers != "sensitivity":
        raise UserError(f"stability: layers must be 'sensitivity' (got {settings.layers!r}): "
                        "the other layer strategies do not depend on the seed set")
    if settings.reduce not in WINDOW_REDUCTIONS:
        raise UserError(f"stability: reduce must be one of {', '.join(WINDOW_REDUCTIONS)} "
                        f"(got {settings.reduce!r}): window IoU needs a window")


# --------------------------------------------------------------------------- the pool


class SampleFile(Mapping[str, torch.Tensor]):
    """One per-sample sensitivity file: its header read once, each tensor read at its offset.

    A draw reads every parameter of k such files, so re-parsing the header on each read (as
    `SensitivityFile` does, ~0.3 ms) would dominate for small models; no file stays mapped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as fh:
            size = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        self._places: dict[str, tuple[int, tuple[int, ...]]] = {}
        for name, entry in header.items():
            if entry["dtype"] != "F32":
                raise ValueError(f"{self.path}: {name} is {entry['dtype']}, expected F32")
            self._places[name] = (8 + size + entry["data_offsets"][0], tuple(entry["shape"]))

    def __getitem__(self, name: str) -> torch.Tensor:
        start, shape = self._places[name]
        out = torch.empty(shape, dtype=torch.float32)
        with self.path.open("rb") as fh:
            fh.seek(start)
            if fh.readinto(memoryview(out.numpy()).cast("B")) != 4 * out.numel():
                raise ValueError(f"{self.path}: {name} is cut short")
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._places

    def __iter__(self) -> Iterator[str]:
        return iter(self._places)

    def __len__(self) -> int:
        return len(self._places)


class SubsetSensitivity(Mapping[str, torch.Tensor]):
    """The sensitivity of a subset of the pool, one parameter at a time: Σ of its samples'."""

    def __init__(self, files: Sequence, indices: Iterable[int]):
        self.files, self.indices = files, list(indices)
        if not self.indices:
            raise ValueError("a subset needs at least one sample")
        self._keys = list(files[self.indices[0]])

    def __getitem__(self, name: str) -> torch.Tensor:
        total = None
        for i in self.indices:
            value = self.files[i][name]
            total = value.to(torch.float64) if total is None else total.add_(value)
        return total.to(torch.float32)

    def __contains__(self, name: object) -> bool:
        return name in self.files[self.indices[0]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class SamplePool:
    """Per-sample sensitivity files of the usable pool samples, and their per-layer sums."""

    files: list[SampleFile]  # one per usable sample
    indices: list[int]  # each file's sample index in the seed file (0-based)
    layer_scores: list[list[float]]  # per usable sample, per teacher layer
    considered: int = 0  # samples in the seed file (usable or not)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, members: Iterable[int]) -> SubsetSensitivity:
        """Sensitivity of the pool members `members` (positions in this pool)."""
        return SubsetSensitivity(self.files, members)


def compute_pool(teacher: torch.nn.Module, samples: Sequence[Mapping[str, Sequence[int]]],
                 folder: Path, metadata: Mapping[str, object], progress: bool = True) -> SamplePool:
    """One forward+backward per sample; each sample's |θ ⊙ g| saved as a sensitivity file.

    Samples with nothing to predict (answer truncated away) are left out, as `sensitivity`
    leaves them out of its sum.
    """
    from paratransfer.arch import arch_for
    from paratransfer.console import progress as progress_bar
    from paratransfer.sensitivity import (
        accumulate_sensitivity,
        layer_scores,
        new_accumulators,
        save_sensitivity,
    )

    arch = arch_for(teacher)
    n_layers = arch.num_layers(teacher)
    accumulators = new_accumulators(teacher)
    pool = SamplePool([], [], [], considered=len(samples))
    with progress_bar(total=len(samples), desc="per-sample sensitivity", unit="sample",
                      enabled=progress) as bar:
        for i, sample in enumerate(samples):
            for acc in accumulators.values():
                acc.zero_()
            _, used = accumulate_sensitivity(teacher, [sample], accumulators=accumulators)
            bar.update()
            if not used:
                continue
            path = folder / f"sample-{i:06d}.safetensors"
            save_sensitivity(path, accumulators, {**metadata, "samples": 1, "pool_index": i})
            pool.files.append(SampleFile(path))
            pool.indices.append(i)
            pool.layer_scores.append(layer_scores(accumulators, arch.layer_of, n_layers))
    return pool


def draw_subsets(pool: int, sizes: Sequence[int], draws: int, seed: int) -> dict[int, list[list[int]]]:
    """For each size k, `draws` random k-subsets of range(pool), each sorted; reproducible for
    a seed, and a size's draws do not depend on which other sizes are asked for."""
    out = {}
    for k in sizes:
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        out[k] = [sorted(torch.randperm(pool, generator=g)[:k].tolist()) for _ in range(draws)]
    return out


# --------------------------------------------------------------------------- the command


def _pool_samples(teacher_id: str, seeds: str | Path, sens_settings) -> list[dict]:
    """The pool tokenized with the teacher's tokenizer, as `sensitivity` tokenizes seeds."""
    from paratransfer import data
    from paratransfer.models import load_tokenizer

    return data.load_tokenized(seeds, load_tokenizer(teacher_id), sens_settings.prompt_format,
                               sens_settings.max_length, limit=sens_settings.max_samples)


@contextlib.contextmanager
def _work_folder(inside: Path, work_dir: str | Path | None) -> Iterator[Path]:
    """A folder for the per-sample files, removed on the way out whatever happens."""
    if work_dir is None:
        folder = inside / "per-sample-sensitivity"
        folder.mkdir()
    else:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="paratransfer-stability-", dir=work_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_disk(teacher: torch.nn.Module, samples: int, folder: Path) -> None:
    """Refuse before the pass when the per-sample files cannot fit."""
    need = samples * 4 * sum(p.numel() for p in teacher.parameters())
    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(f"{folder}: the per-sample sensitivity needs {need / 2**30:.1f} GiB "
                        f"({samples} samples x one sensitivity file), only {free / 2**30:.1f} GiB "
                        "free (give --work-dir on a larger disk, or fewer --max-samples)")


def run_stability(teacher_id: str, student_id: str, seeds: str | Path, out: str | Path,
                  settings: StabilitySettings, extract_settings, sens_settings,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  overwrite: bool = False, progress: bool = True,
                  work_dir: str | Path | None = None) -> dict[str, Any]:
    """`paratransfer stability`: write stability.json, stability.png and stability.md to `out`."""
    from paratransfer import data
    from paratransfer.arch import arch_for
    from paratransfer.console import progress as progress_bar
    from paratransfer.extract import extract, vocabulary_for
    from paratransfer.models import fingerprint, load_model, model_label
    from paratransfer.outputs import atomic_dir, check_output_path
    from paratransfer.pipeline import _tokenizers_for
    from paratransfer.stability_figures import choice_of, compare
    from paratransfer.stability_report import summarize, write_report

    out = check_output_path(out, overwrite, [teacher_id, student_id, seeds])
    check_extract_settings(extract_settings)
    started = time.time()
    samples = _pool_samples(teacher_id, seeds, sens_settings)
    settings.sizes_for(len(samples))  # sizes beyond the pool fail before any model is loaded
    teacher = load_model(teacher_id, dtype=dtype, device=device)
    student = load_model(student_id, dtype="auto", device="cpu")
    arch_for(teacher)  # unsupported architectures fail before any work
    arch_for(student)
    teacher_tokenizer, student_tokenizer, _ = _tokenizers_for(teacher_id, student_id,
                                                             extract_settings)
    vocab = vocabulary_for(teacher.config, student, extract_settings, teacher_tokenizer,
                           student_tokenizer)
    from paratransfer.gguf_models import gguf_provenance

    provenance = {"teacher": model_label(teacher_id), "student": model_label(student_id),
                  **gguf_provenance("teacher", teacher_id),
                  **gguf_provenance("student", student_id),
                  "seeds": str(Path(seeds).resolve()), "seeds_sha256": data.file_digest(seeds)}
    meta = {"teacher": provenance["teacher"], "teacher_fingerprint": fingerprint(teacher),
            "prompt_format": sens_settings.prompt_format, "max_length": sens_settings.max_length}
    with atomic_dir(out, overwrite) as tmp:
        with _work_folder(tmp, work_dir) as work:
            _check_disk(teacher, len(samples), work)
            pool = compute_pool(teacher, samples, work, meta, progress)
            if not len(pool):
                raise UserError(f"{seeds}: no sample has an answer token left after truncation "
                                f"to {sens_settings.max_length} tokens")
            sizes = settings.sizes_for(len(pool))
            subsets = draw_subsets(len(pool), sizes, settings.draws, settings.seed)

            def choose(members: Iterable[int]):
                return extract(teacher, student, pool.subset(members), extract_settings,
                               vocab=vocab)

            full = choose(range(len(pool)))
            full_choice = choice_of(full)
            draws: dict[int, list[dict[str, Any]]] = {}
            with progress_bar(total=len(sizes) * settings.draws, desc="draws", unit="draw",
                              enabled=progress) as bar:
                for k, members_list in subsets.items():
                    for members in members_list:
                        choice = choice_of(choose(members))
                        draws.setdefault(k, []).append({
                            "samples": [pool.indices[m] for m in members],
                            "selected_layers": choice.layers,
                            "windows": {key: list(w[:2]) for key, (_, w, _) in choice.windows.items()},
                            **compare(choice, full_choice)})
                        bar.update()
        report = summarize(provenance, settings, extract_settings, sens_settings, pool, full,
                           full_choice, draws, seconds=time.time() - started)
        write_report(report, tmp)
    return report
