"""The adapter: factors -> PEFT LoRA adapter, residual init, plain-LoRA conversion, merge."""

from paratransfer.io.moved import reexport

__getattr__, __dir__ = reexport("paratransfer.adapter.write")
