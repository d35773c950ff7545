"""Experiments: recipes, preflight checks, the runner, results and figures."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.experiment.runner")
