"""Float comparisons that hold on any CPU, and the logits they compare.

Two computations of the same value with different batch sizes, thread counts, process counts or
kernels agree to the rounding of their dtype, not bit for bit (a judge's log-probabilities at
batch 4 and batch 2 differed by 5e-7 on one machine and were equal on another). Tests compare
such values with these tolerances, or assert the decision the values lead to when the margin
is clearly larger than the tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: (rtol, atol) per dtype: torch.testing.assert_close's defaults, which scale with the dtype's
#: precision.
_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


def tolerance(dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """rtol/atol for values computed in `dtype` by differently shaped kernels."""
    rtol, atol = _TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def assert_floats_close(got: Sequence[float], want: Sequence[float],
                        dtype: torch.dtype = torch.float32) -> None:
    """Two lists of numbers computed in `dtype` agree within that dtype's tolerance."""
    torch.testing.assert_close(torch.tensor(list(got), dtype=torch.float64),
                               torch.tensor(list(want), dtype=torch.float64), **tolerance(dtype))


def decisive_margin(values: Sequence[float], dtype: torch.dtype = torch.float32) -> bool:
    """Whether the best value beats the runner-up by far more than rounding could move them
    (ten times the tolerance at their scale): a decision that must not depend on the kernel."""
    top = sorted(values, reverse=True)
    t = tolerance(dtype)
    return top[0] - top[1] > 10 * (t["atol"] + t["rtol"] * abs(top[0]))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A model's fp32 logits for a batch of token ids, in eval mode (dropout off)."""
    model.eval()
    return model(input_ids=ids).logits.float()
