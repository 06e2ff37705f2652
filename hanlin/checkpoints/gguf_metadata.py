"""A GGUF file's key/value metadata as plain Python values (str, int, float, bool, lists of those)."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

_ARRAY = gguf.GGUFValueType.ARRAY
_STRING = gguf.GGUFValueType.STRING
_BOOL = gguf.GGUFValueType.BOOL
_FLOATS = (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64)


def read_gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field of `reader`; strings are decoded as UTF-8 (invalid bytes become U+FFFD)."""
    return {name: _field_value(reader, field) for name, field in reader.fields.items()}


def _field_value(reader: gguf.GGUFReader, field: gguf.ReaderField) -> Any:
    if not field.types:
        return None
    if field.types[0] != _ARRAY:
        return _scalar(field.parts[field.data[0]], field.types[0])
    # Nested arrays come back flattened, as the reader itself stores them.
    item_type = field.types[-1]
    parts = [field.parts[index] for index in field.data]
    if item_type == _STRING:
        return [part.tobytes().decode("utf-8", errors="replace") for part in parts]
    values = _contiguous_numbers(reader, parts) if len(field.types) == 2 else None
    if values is None:
        values = np.concatenate(parts) if parts else np.empty(0)
    if item_type == _BOOL:
        return [bool(value) for value in values.tolist()]
    return values.tolist()


def _scalar(part: np.ndarray, value_type: gguf.GGUFValueType) -> Any:
    if value_type == _STRING:
        return part.tobytes().decode("utf-8", errors="replace")
    if value_type == _BOOL:
        return bool(part[0])
    if value_type in _FLOATS:
        return float(part[0])
    return int(part[0])


def _contiguous_numbers(reader: gguf.GGUFReader, parts: list[np.ndarray]) -> np.ndarray | None:
    """One view over the whole array: the reader keeps a one-element view per item, which is slow to join."""
    if not parts:
        return None
    first, last = parts[0], parts[-1]
    start = first.ctypes.data - reader.data.ctypes.data
    length = len(parts) * first.itemsize
    if last.ctypes.data - first.ctypes.data != length - first.itemsize or any(p.size != 1 for p in (first, last)):
        return None
    return reader.data[start : start + length].view(first.dtype)
