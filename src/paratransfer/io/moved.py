"""Old import paths of the flat layout, kept working for one release with a DeprecationWarning.

`install()` puts a finder first on `sys.meta_path` that answers `import paratransfer.OLD` with the
module now at its stage folder (the same module object, so attributes set through either name
are seen through both). `reexport` gives a stage package the names its old flat module had.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Callable

#: old module (under `paratransfer.`) -> the modules now holding its names, first one first.
MOVED: dict[str, tuple[str, ...]] = {
    "cli_options": ("cli.options",), "cli_data": ("cli.data",), "cli_evaluate": ("cli.evaluate",),
    "cli_stability": ("cli.stability",), "cli_train": ("cli.train",),
    "console": ("io.console",), "checks": ("io.checks",), "outputs": ("io.outputs",),
    "readers": ("io.readers",), "errors": ("io.errors",), "devices": ("io.devices",),
    "distributed": ("io.distributed",),
    "weights": ("teacher.weights",), "lazy_weights": ("teacher.lazy",),
    "streamed_teacher": ("teacher.streamed",), "models": ("teacher.models",),
    "stream": ("sensitivity.streamed",), "activations": ("sensitivity.activations",),
    "pipeline": ("sensitivity.step", "extract.step"),
    "align": ("extract.strategies",), "factorize": ("extract.factorize",),
    "certified_svd": ("extract.certified_svd",), "vocab": ("extract.vocab",),
    "inject": ("adapter.inject",), "merge": ("adapter.merge",),
    "data": ("tasks.examples",),
    "stability_figures": ("stability.figures",), "stability_report": ("stability.report",),
    "recipe": ("experiment.recipe",), "preflight": ("experiment.preflight",),
    "results": ("experiment.results",), "plots": ("extract.plots",),
    "tiny": ("demo.tiny",),
    # each task in one module of tasks/ (data source format, prompt and score together)
    "evaluate.gsm": ("tasks.gsm",), "evaluate.mmlu": ("tasks.mmlu",),
    "evaluate.super_ni": ("tasks.super_ni",), "evaluate.open": ("tasks.open",),
}

_ROOT = "paratransfer."


def _new_module(old: str) -> types.ModuleType:
    """The module (or, for a split module, a view over its parts) an old path now names."""
    parts = [importlib.import_module(_ROOT + new) for new in MOVED[old]]
    if len(parts) == 1:
        return parts[0]
    view = types.ModuleType(_ROOT + old, f"moved to {', '.join(p.__name__ for p in parts)}")
    view.__getattr__, view.__dir__ = _lookup(parts)
    return view


def _lookup(parts: list[types.ModuleType]) -> tuple[Callable, Callable]:
    def __getattr__(name: str):
        for part in parts:
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(f"module {parts[0].__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({n for p in parts for n in dir(p)})

    return __getattr__, __dir__


class _MovedLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return types.ModuleType(spec.name)

    def exec_module(self, module) -> None:
        old = module.__name__[len(_ROOT):]
        new = ", ".join(_ROOT + n for n in MOVED[old])
        warnings.warn(f"{module.__name__} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        # The import system returns what sys.modules holds under the name after exec_module.
        sys.modules[module.__name__] = _new_module(old)


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_ROOT) and fullname[len(_ROOT):] in MOVED:
            return importlib.machinery.ModuleSpec(fullname, _MovedLoader())
        return None


def install() -> None:
    """Answer the old import paths (once per process)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def reexport(*modules: str) -> tuple[Callable, Callable]:
    """A package's `__getattr__` and `__dir__` serving the names of `modules`, imported on first
    use, so the package's old flat path keeps its names without importing them eagerly."""
    def parts() -> list[types.ModuleType]:
        return [importlib.import_module(m) for m in modules]

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _lookup(parts())[0](name)

    def __dir__() -> list[str]:
        return _lookup(parts())[1]()

    return __getattr__, __dir__
