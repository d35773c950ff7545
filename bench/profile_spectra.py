"""Measured singular-value profiles of a real checkpoint, for the extraction benchmark's stand-ins.

Loads the Gemma 3 270M model folder the real-model test tier converts from its GGUF file
(`tests/real_models.py`: pinned packages from the package index, SHA-256-checked, Q4_K_M
dequantized to float32, so the weights carry 4-bit quantization noise) and, for every role
(q, k, v, o, gate, up, down) of every layer and for the (tied) embedding, computes the exact
singular values of the whole teacher matrix in float64 (`torch.linalg.svdvals`; the embedding,
262144 x 640, through its 640 x 640 Gram matrix). Per role it stores, as the median over layers:

* ``grid``: σ(i)/σ_1 at relative index i/n, for the fixed grid ``GRID`` (linear interpolation;
  n = the matrix's smaller side);
* ``top``: σ_1..σ_64 / σ_1;
* ``stats``: top-16 energy share Σ_{i≤16}σ_i² / ‖W‖²_F, σ16/σ1, σ17/σ16 (median, min, max
  over layers), the RMS entry ‖W‖_F/√(mn) and σ_1 (absolute, median).

Run: ``.venv/bin/python bench/profile_spectra.py [--out bench/profiles/gemma3-270m.json]``
(about a minute on 2 cores). The JSON is committed; `bench_extract.py --spectrum real` reads it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
from importlib.metadata import version
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "profiles" / "gemma3-270m.json"
ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}
GRID = [0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3,
        0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
TOP = 64
RANK = 16


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Exact singular values in float64, largest first (via the Gram matrix when very tall)."""
    m, n = w.shape
    if max(m, n) > 8 * min(m, n) and max(m, n) > 16384:
        a = w if m > n else w.T
        gram = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64)
        for rows in a.split(16384):
            rows = rows.double()
            gram += rows.T @ rows
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    return torch.linalg.svdvals(w.double())


def describe(s: torch.Tensor, w: torch.Tensor) -> dict:
    """One matrix's normalized profile and statistics."""
    n = s.numel()
    rel = s / s[0]
    positions = torch.tensor(GRID, dtype=torch.float64) * (n - 1)
    lo = positions.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = positions - lo
    grid = rel[lo] * (1 - frac) + rel[hi] * frac
    sq = s.square()
    return {
        "n": n,
        "grid": grid.tolist(),
        "top": rel[:TOP].tolist(),
        "energy_top16": float(sq[:RANK].sum() / sq.sum()),
        "s16_over_s1": float(s[RANK - 1] / s[0]),
        "s17_over_s16": float(s[RANK] / s[RANK - 1]),
        "rms_entry": float(w.double().square().mean().sqrt()),
        "sigma1": float(s[0]),
    }


def median_profile(rows: list[dict]) -> dict:
    """Median over layers of the profile, and median/min/max of the statistics."""
    def med(key: str) -> list[float]:
        return [statistics.median(col) for col in zip(*(r[key] for r in rows), strict=True)]

    stats = {}
    for key in ("energy_top16", "s16_over_s1", "s17_over_s16"):
        values = [r[key] for r in rows]
        stats[key] = {"median": statistics.median(values), "min": min(values),
                      "max": max(values)}
    for key in ("rms_entry", "sigma1"):
        stats[key] = statistics.median(r[key] for r in rows)
    return {"matrices": len(rows), "n": rows[0]["n"], "grid": med("grid"), "top": med("top"),
            "stats": stats}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-embed", action="store_true", help="skip the 262144 x 640 embedding")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from safetensors import safe_open
    from tests.real_models import GEMMA3_270M, real_model_folder

    gguf, folder = real_model_folder(GEMMA3_270M)  # fetched/converted once; checked by SHA-256
    config = json.loads((folder / "config.json").read_text())
    layers = config["num_hidden_layers"]
    profiles: dict[str, dict] = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for role, path in ROLES.items():
            rows = []
            for layer in range(layers):
                w = f.get_tensor(f"model.layers.{layer}.{path}.weight")
                rows.append(describe(singular_values(w), w))
            profiles[role] = {"shape": list(w.shape), **median_profile(rows)}
            st = profiles[role]["stats"]
            print(f"  {role:5} {tuple(w.shape)}: top-16 energy {st['energy_top16']['median']:.3f}"
                  f", σ16/σ1 {st['s16_over_s1']['median']:.3f}, σ17/σ16 "
                  f"{st['s17_over_s16']['median']:.3f}", flush=True)
        if not args.no_embed:
            w = f.get_tensor("model.embed_tokens.weight")
            profiles["embed"] = {"shape": list(w.shape),
                                 **median_profile([describe(singular_values(w), w)])}
            st = profiles["embed"]["stats"]
            print(f"  embed {tuple(w.shape)}: top-16 energy {st['energy_top16']['median']:.3f}, "
                  f"σ16/σ1 {st['s16_over_s1']['median']:.3f}", flush=True)
            del w
    source = json.loads((folder / "gguf_source.json").read_text())
    result = {
        "model": "Gemma 3 270M (base)",
        "provenance": {
            "packages": list(GEMMA3_270M.packages),
            "gguf_file": GEMMA3_270M.filename,
            "gguf_sha256": GEMMA3_270M.sha256,
            "gguf_sha256_checked": source.get("sha256") == GEMMA3_270M.sha256,
            "quantization": "Q4_K_M, 4-bit quantization noise: the weights are the GGUF file's "
                            "values dequantized to float32 (paratransfer.teacher.gguf)",
            "converted_with": {"transformers": source.get("transformers"),
                               "gguf": version("gguf")},
            "fetched_by": "tests/real_models.py (the real-model test tier)",
            "date": _dt.date.today().isoformat(),
            "torch": torch.__version__,
            "script": "bench/profile_spectra.py",
        },
        "method": "exact singular values of each whole teacher matrix in float64; per role the "
                  "median over layers of σ_i/σ_1 (grid: at relative index i/n, n = smaller "
                  "side; top: i = 1..64), and median/min/max of the statistics",
        "layers": layers,
        "rank": RANK,
        "grid_points": GRID,
        "roles": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({gguf.name})")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
