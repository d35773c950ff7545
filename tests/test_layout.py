"""The package layout: every module in a stage folder, and the old flat import paths still
answering (same module object, with a DeprecationWarning) for one release."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest

import paratransfer
from paratransfer.io.moved import MOVED

PACKAGE = Path(paratransfer.__file__).parent


def test_no_module_outside_a_stage_folder():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_warns_and_names_the_moved_module(old):
    new = [importlib.import_module(f"paratransfer.{n}") for n in MOVED[old]]
    importlib.sys.modules.pop(f"paratransfer.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"paratransfer.{old} moved to"):
        module = importlib.import_module(f"paratransfer.{old}")
    if len(new) == 1:
        assert module is new[0]
    for part in new:
        public = [n for n in vars(part) if not n.startswith("_")]
        assert public and all(getattr(module, n) is getattr(part, n) for n in public)


def test_split_pipeline_serves_both_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from paratransfer.pipeline import SensitivitySettings, run_extract, run_sensitivity
    from paratransfer.extract.step import run_extract as extract_step
    from paratransfer.sensitivity.step import SensitivitySettings as settings
    from paratransfer.sensitivity.step import run_sensitivity as sensitivity_step

    assert (SensitivitySettings, run_extract, run_sensitivity) == (
        settings, extract_step, sensitivity_step)


def test_stage_packages_keep_their_old_flat_names():
    from paratransfer.extract import ExtractSettings, extract
    from paratransfer.extract.plan import ExtractSettings as settings
    from paratransfer.extract.plan import extract as function
    from paratransfer.sensitivity import SensitivityFile
    from paratransfer.sensitivity.accumulate import SensitivityFile as sensitivity_file

    assert (extract, ExtractSettings, SensitivityFile) == (function, settings, sensitivity_file)
    with pytest.raises(AttributeError):
        paratransfer.extract.no_such_name  # noqa: B018


def test_no_module_imports_an_underscored_name_from_another():
    import ast

    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paratransfer"):
                found += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_")
                          and not a.name.startswith("__")]
    assert found == []
