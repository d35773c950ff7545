"""Stability of the choices over random seed subsets: pool, figures, report."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.stability.pool")
