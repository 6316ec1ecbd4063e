"""Random JSON schemas for the constrained-output tests and benchmark: nested objects,
arrays with bounds, enums, integers and numbers, strings with length bounds and patterns,
optional fields."""

from __future__ import annotations

import random
from typing import Any

PATTERNS = ["[a-z]{2,5}", "[A-Z][a-z]{1,4}", "[0-9]{3}-[0-9]{2}", "(yes|no)", "x[0-9]+"]
WORDS = ["red", "green", "blue", "cat", "dog", "one", "two", "alpha", "beta"]


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A random object schema; ``depth`` limits nesting to two levels below the top."""
    names = rng.sample(["id", "name", "tags", "size", "kind", "score", "ok", "meta", "note", "items"], rng.randint(1, 4))
    properties = {name: _value(rng, depth) for name in names}
    required = [n for n in names if rng.random() < 0.6]
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "pattern", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 6)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 4))}
    if kind == "array":
        low = rng.randint(0, 2)
        items = rng.choice([{"type": "integer"}, {"type": "boolean"}, {"enum": rng.sample(WORDS, 2)},
                            {"type": "string", "maxLength": 4}])
        return {"type": "array", "items": items, "minItems": low, "maxItems": low + rng.randint(0, 3)}
    if kind == "object":
        return random_schema(rng, depth + 1)
    return {"type": kind}
