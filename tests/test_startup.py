"""`paratransfer --help`, every `COMMAND --help` and every usage error answer without importing
the heavy libraries (checked through `sys.modules` in a fresh interpreter, not by timing)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "datasets", "matplotlib", "accelerate", "safetensors")

#: Runs the CLI's main in a fresh interpreter, then prints its exit code and the heavy modules
#: that got imported.
PROBE = """
import json, sys
from paratransfer.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print("PROBE " + json.dumps({{"code": code, "heavy": heavy}}))
"""

COMMANDS = ("sensitivity", "extract", "train", "merge", "evaluate", "stability", "data", "run",
            "demo")


def _probe(*argv: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stdout + proc.stderr
    return json.loads(line[-1][len("PROBE "):]), proc.stdout + proc.stderr


def test_top_level_help_imports_no_heavy_library():
    result, out = _probe("--help")
    assert result == {"code": 0, "heavy": []}
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_imports_no_heavy_library(command):
    result, out = _probe(command, "--help")
    assert result == {"code": 0, "heavy": []}
    assert f"paratransfer {command}" in out  # argparse's usage line: the command's own help


@pytest.mark.parametrize("argv", [
    ("bogus",),                                               # unknown command
    ("train",),                                               # required flags missing
    ("train", "--student", "s", "--data", "d", "--out", "o", "--epochs", "x"),  # not a number
    ("train", "--student", "s", "--data", "d", "--out", "o", "--init", "nope"),  # not a choice
    ("extract", "--teacher", "t"),
    ("evaluate", "--model", "m", "--task", "gsm", "--data", "d", "--out", "o", "--shots", "two"),
    ("stability", "--teacher", "t", "--draws", "many"),
])
def test_usage_errors_import_no_heavy_library(argv):
    result, out = _probe(*argv)
    assert result == {"code": 2, "heavy": []}, out
    assert "error:" in out
