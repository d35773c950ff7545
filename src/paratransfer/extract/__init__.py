"""Extraction: settings and step, the plan, strategies (layer windows, block reductions),
factorization, the certified SVD, vocabulary alignment."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.extract.plan")
