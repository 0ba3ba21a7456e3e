"""Press specifications as text, ``"<press>:<field>=<value>,..."``: the one parser that the CLI
(:mod:`clusterattn.eval.spec`) and the vLLM plugin (:mod:`clusterattn.vllm.spec`) share.

Values are read strictly: ASCII integers (``256``, ``-3``), ASCII decimals (``0.5``, ``1e-3``),
``true``/``false``, ``none``/``null``, anything else a string. Duplicate fields, empty field names
and non-ASCII digits are errors; whether a value is valid for its field (NaN, infinities, ranges,
types) is decided by the press's own constructor, which :func:`build_press` calls.
"""

from __future__ import annotations

import dataclasses
import re

from clusterattn.presses import PRESSES

_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf|infinity)", re.I)


def parse_value(text: str) -> object:
    """One field value: int, float, bool, None or (anything else) the stripped string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)  # NaN and infinities stay floats: the press refuses them by name
    if any(ch.isdigit() for ch in text) and not text.isascii():
        raise ValueError(f"value {text!r}: digits must be ASCII")
    return text


def parse_fields(text: str, spec: str) -> dict[str, object]:
    """``"budget=256, window_size=16"`` -> ``{"budget": 256, "window_size": 16}``; ``spec`` names the
    whole specification in error messages."""
    fields: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"press {spec!r}: field {item!r} is not field=value")
        if key in fields:
            raise ValueError(f"press {spec!r}: field {key!r} is given twice")
        try:
            fields[key] = parse_value(value)
        except ValueError as err:
            raise ValueError(f"press {spec!r}: field {key!r}: {err}") from None
    return fields


def split_spec(spec: str) -> tuple[str, str]:
    """``"snapkv:budget=128"`` -> ``("snapkv", "budget=128")``; the name lower-cased."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty press specification")
    name, _, rest = spec.strip().partition(":")
    return name.strip().lower(), rest


def build_press(name: str, fields: dict[str, object], spec: str):
    """``PRESSES[name](**fields)``; every error (unknown press or field, bad value) as a
    ``ValueError`` naming the specification and, where it can, the field."""
    if name not in PRESSES:
        raise ValueError(f"press {spec!r}: unknown press {name!r}; choose from {sorted(PRESSES)}")
    cls = PRESSES[name]
    accepted = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(fields) - accepted)
    if unknown:
        raise ValueError(
            f"press {spec!r}: {cls.__name__} has no field {unknown[0]!r}; it accepts {sorted(accepted)}"
        )
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"press {spec!r}: {err}") from None
