"""Reading the files other steps wrote (JSON records, safetensors tensors), with one-line errors.

A truncated or corrupt file — a model's weights, an adapter, a checkpoint, a sensitivity file —
is a `UserError` naming the file and what is wrong with it, never a library traceback. A
safetensors file is checked before it is trusted: its header must parse and its tensors must
cover the file exactly (a truncated download or an interrupted copy fails that test).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from paratransfer.io.errors import UserError

#: Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_json(path: str | Path, what: str = "a JSON file") -> Any:
    """The parsed JSON of `path`; a missing, undecodable or invalid file is a UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (expected {what})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start} (expected {what})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}; "
                        f"expected {what})") from None


def json_line(raw: bytes | str, where: str, expected: str = "one JSON object per line") -> Any:
    """One JSONL line parsed, with every string in it encodable as UTF-8; `where` is FILE:LINE.

    JSON may spell a lone surrogate (`"\\ud800"`), which Python decodes into a string no
    tokenizer or writer accepts: refused here, naming the line, before any step sees it.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 at byte {e.start} (expected UTF-8 JSON)") from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON: {e.msg} at column {e.colno} (expected {expected})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply (expected {expected})") from None
    _check_text(value, where)
    return value


def _check_text(value: Any, where: str) -> None:
    """Refuse strings (keys too) holding a lone surrogate, which UTF-8 cannot encode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(f"{where}: a string holds the lone surrogate "
                                f"\\u{ord(item[e.start]):04x} at character {e.start} (expected "
                                "text that UTF-8 can encode)") from None


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The header of a safetensors file after checking the file is whole: the header parses,
    every tensor's byte range fits its dtype and shape, and the ranges cover the data exactly."""
    return safetensors_layout(path)[0]


def safetensors_layout(path: str | Path) -> tuple[dict[str, Any], int]:
    """`safetensors_header`, and the byte where the data (which `data_offsets` count from)
    starts: for readers that seek to each tensor themselves."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise _Bad(f"{size} bytes, too short for a header")
            n = int.from_bytes(raw, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise _Bad(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (_Bad, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a complete safetensors file ({e}); was it truncated or "
                        "damaged?") from None
    try:
        _check_layout(header, size - 8 - n)
    except _Bad as e:
        raise UserError(f"{path}: not a complete safetensors file ({e}); was it truncated or "
                        "damaged?") from None
    return header, 8 + n


class _Bad(Exception):
    pass


def _check_layout(header: Any, data_bytes: int) -> None:
    if not isinstance(header, dict):
        raise _Bad("the header is not a JSON object")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _Bad(f"tensor {name!r} has no dtype, shape and data_offsets") from None
        if dtype in _DTYPE_BYTES and isinstance(shape, list):  # (sub-byte types: offsets only)
            want = math.prod(shape) * _DTYPE_BYTES[dtype]
            if end - start != want:
                raise _Bad(f"tensor {name!r} takes {end - start} bytes, its shape needs {want}")
        ranges.append((start, end, name))
    position = 0
    for start, end, name in sorted(ranges):
        if start != position or end < start:
            raise _Bad(f"tensor {name!r} does not start where the previous one ends")
        position = end
    if position != data_bytes:
        raise _Bad(f"the tensors take {position} bytes but the file holds {data_bytes}")


def load_tensors(path: str | Path) -> dict:
    """Every tensor of a safetensors file (checked first with `safetensors_header`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read its tensors ({first})") from None


def check_model_folder(name_or_path: str | Path) -> None:
    """For a local model folder: its config is valid JSON and every safetensors weights file
    (the single file, or each shard the index lists) is whole. Hub ids are left to the loader."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    if (folder / "config.json").is_file():
        read_json(folder / "config.json", "a model config")
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        weight_map = read_json(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' (expected a safetensors index)")
        files = sorted({folder / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: listed in {index.name} but missing")
    for f in files:
        safetensors_header(f)
