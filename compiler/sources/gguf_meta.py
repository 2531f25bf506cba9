"""GGUF key/value metadata as plain Python values (str, int, float, bool, lists of them).

The tokenizer converter and the family files read metadata as ordinary values, and the index
stores some of it through msgpack, so numpy scalars and byte arrays must not leak out.
"""

from __future__ import annotations

from typing import Any

from ...pack_format.errors import SourceError

_ARRAY = 9    # gguf.GGUFValueType.ARRAY
_STRING = 8   # gguf.GGUFValueType.STRING


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Convert a `gguf.GGUFReader`'s fields to plain Python values.

    The header pseudo-fields (`GGUF.version`, `GGUF.tensor_count`, ...) are left out.
    A 49k-token vocabulary converts in tens of milliseconds.

    Args:
        reader: an open `gguf.GGUFReader`.
    Returns:
        `{key: value}`; arrays become lists, strings are decoded as UTF-8.
    Raises:
        SourceError: a string is not valid UTF-8 (the key is named).
    Example:
        >>> gguf_metadata(gguf.GGUFReader(path))["tokenizer.ggml.model"]
        'gpt2'
    """
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = _value(field)
        except UnicodeDecodeError as e:
            raise SourceError(f"GGUF key {key!r}: string is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return out


def _value(field: Any) -> Any:
    # `contents()` (gguf >= 0.11) already yields plain values; older readers only have parts/data.
    if hasattr(field, "contents"):
        v = field.contents()
        return v.tolist() if hasattr(v, "tolist") else v
    if not field.types:
        return None
    parts, data = field.parts, field.data
    main = int(field.types[0])
    if main == _ARRAY:
        if int(field.types[-1]) == _STRING:
            return [bytes(parts[i]).decode("utf-8") for i in data]
        return [x for i in data for x in parts[i].tolist()]
    if main == _STRING:
        return bytes(parts[-1]).decode("utf-8")
    return parts[-1].tolist()[0]
