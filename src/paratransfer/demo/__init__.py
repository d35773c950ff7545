"""The built-in demo: its world and recipe, and the tiny models it builds."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.demo.world")
