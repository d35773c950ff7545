"""Sensitivity Σ|θ·∇L|: settings and step, accumulation during backward, the streamed
teacher, kept activations, the sensitivity file."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.sensitivity.accumulate")
