"""How stable is what gets transferred? The method's choices on random subsets of a seed pool.

`paratransfer stability` asks: had the seed set been another k examples of the same task, would
the same teacher layers, the same window of every matrix and the same rank-r factor subspaces
have been chosen? Each draw of k samples is compared with the choice made from the whole pool.

Sensitivity is a sum over samples (docs/method.md §1), so a subset's sensitivity is the sum of
its samples' |θ ⊙ g|. Every pool sample gets exactly one forward+backward (the hooks of
`sensitivity.accumulate`, into one set of fp32 accumulators zeroed between samples), and its |θ ⊙ g| is
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
`figures.py`; the report files are written by `report.py`.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paratransfer.io.checks import MAX_SEED
from paratransfer.io.errors import UserError
from paratransfer.stability.settings import (  # noqa: F401  (their old home)
    DEFAULT_DRAWS,
    DEFAULT_SIZES,
    RECIPE_KEYS,
    WINDOW_REDUCTIONS,
    StabilitySettings,
    check_extract_settings,
    parse_sizes,
)

# --------------------------------------------------------------------------- the pool


class SampleFile(Mapping[str, torch.Tensor]):
    """One per-sample sensitivity file: its header read once, each tensor read at its offset.

    A draw reads every parameter of k such files, so re-parsing the header on each read (as
    `SensitivityFile` does, ~0.3 ms) would dominate for small models; no file stays mapped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        from paratransfer.io.readers import safetensors_layout

        header, start = safetensors_layout(self.path)
        header.pop("__metadata__", None)
        self._places: dict[str, tuple[int, tuple[int, ...]]] = {}
        for name, entry in header.items():
            if entry["dtype"] != "F32":
                raise ValueError(f"{self.path}: {name} is {entry['dtype']}, expected F32")
            self._places[name] = (start + entry["data_offsets"][0], tuple(entry["shape"]))

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
    from paratransfer.io.console import progress as progress_bar
    from paratransfer.sensitivity.accumulate import (
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
        g = torch.Generator().manual_seed((seed * 1_000_003 + k) % MAX_SEED)
        out[k] = [sorted(torch.randperm(pool, generator=g)[:k].tolist()) for _ in range(draws)]
    return out


# --------------------------------------------------------------------------- the command


def _pool_samples(teacher_id: str, seeds: str | Path, sens_settings) -> list[dict]:
    """The pool tokenized with the teacher's tokenizer, as `sensitivity` tokenizes seeds."""
    from paratransfer.tasks import examples as data
    from paratransfer.teacher.models import load_tokenizer

    return data.load_tokenized(seeds, load_tokenizer(teacher_id), sens_settings.prompt_format,
                               sens_settings.max_length, limit=sens_settings.max_samples)


#: The work folder's name: `.paratransfer-stability.partial-PID-XXXXXXXX` in the work dir, so
#: that the one a killed run left is removed by the next run there (`outputs.clean_stale`).
WORK_NAME = "paratransfer-stability"
#: Room kept free beyond the per-sample files: the report (json, md, png) written beside them.
REPORT_ROOM = 8 * 2**20


@contextlib.contextmanager
def _work_folder(work_dir: Path) -> Iterator[Path]:
    """A folder for the per-sample files in `work_dir`, removed on the way out whatever
    happens; those of killed earlier runs there are removed first."""
    from paratransfer.io.outputs import clean_stale, disk_full_as_error, scratch_dir

    work_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(work_dir, WORK_NAME)
    with disk_full_as_error(work_dir):
        folder = scratch_dir(work_dir, WORK_NAME)
    try:
        with disk_full_as_error(work_dir, folder, hint=" (--work-dir)"):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pool_bytes(teacher: torch.nn.Module, samples: int, metadata: Mapping[str, object]) -> int:
    """Disk the per-sample files take: `samples` sensitivity files, headers included (each
    header's metadata with the largest pool index it can carry)."""
    from paratransfer.sensitivity.accumulate import sensitivity_file_bytes

    shapes = {n: tuple(p.shape) for n, p in teacher.named_parameters()}
    one = sensitivity_file_bytes(shapes, {**metadata, "samples": 1,
                                          "pool_index": max(samples - 1, 0)})
    return samples * one


def _check_disk(need: int, samples: int, work_dir: Path) -> None:
    """Refuse before the pass when the per-sample files (and the report) cannot fit."""
    free = free_bytes(work_dir)
    if need + REPORT_ROOM > free:
        raise UserError(f"{work_dir}: the per-sample sensitivity needs {_size(need)} ({samples} "
                        f"samples x one sensitivity file of {_size(need // max(samples, 1))}) "
                        f"and {_size(REPORT_ROOM)} for the report; only {_size(free)} free "
                        "(give --work-dir on a larger disk, or fewer --max-samples)")


def free_bytes(folder: Path) -> int:
    """Free space where `folder` is (the disk probe, one place to replace in tests)."""
    from paratransfer.io.outputs import free_space

    return free_space(folder)


def _size(n: int) -> str:
    from paratransfer.io.outputs import human_size

    return human_size(n)


def run_stability(teacher_id: str, student_id: str, seeds: str | Path, out: str | Path,
                  settings: StabilitySettings, extract_settings, sens_settings,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  overwrite: bool = False, progress: bool = True,
                  work_dir: str | Path | None = None) -> dict[str, Any]:
    """`paratransfer stability`: write stability.json, stability.png and stability.md to `out`."""
    from paratransfer.arch import arch_for
    from paratransfer.extract.plan import extract, vocabulary_for
    from paratransfer.extract.step import tokenizers_for
    from paratransfer.io.console import progress as progress_bar
    from paratransfer.io.outputs import absolute, atomic_dir, check_output_path, check_work_folder
    from paratransfer.stability.figures import choice_of, compare
    from paratransfer.stability.report import summarize, write_report
    from paratransfer.tasks import examples as data
    from paratransfer.teacher.models import fingerprint, load_model, model_label

    out = check_output_path(out, overwrite, [teacher_id, student_id, seeds])
    work_dir = out.parent if work_dir is None else absolute(work_dir)
    check_work_folder(work_dir, "--work-dir")
    check_extract_settings(extract_settings)
    started = time.time()
    samples = _pool_samples(teacher_id, seeds, sens_settings)
    settings.sizes_for(len(samples))  # sizes beyond the pool fail before any model is loaded
    teacher = load_model(teacher_id, dtype=dtype, device=device)
    student = load_model(student_id, dtype="auto", device="cpu")
    arch_for(teacher)  # unsupported architectures fail before any work
    arch_for(student)
    teacher_tokenizer, student_tokenizer, _ = tokenizers_for(teacher_id, student_id,
                                                             extract_settings)
    vocab = vocabulary_for(teacher.config, student, extract_settings, teacher_tokenizer,
                           student_tokenizer)
    from paratransfer.teacher.gguf import gguf_provenance

    provenance = {"teacher": model_label(teacher_id), "student": model_label(student_id),
                  **gguf_provenance("teacher", teacher_id),
                  **gguf_provenance("student", student_id),
                  "seeds": str(Path(seeds).resolve()), "seeds_sha256": data.file_digest(seeds)}
    meta = {"teacher": provenance["teacher"], "teacher_fingerprint": fingerprint(teacher),
            "prompt_format": sens_settings.prompt_format, "max_length": sens_settings.max_length}
    _check_disk(pool_bytes(teacher, len(samples), meta), len(samples), work_dir)
    with atomic_dir(out, overwrite) as tmp:
        with _work_folder(work_dir) as work:
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
