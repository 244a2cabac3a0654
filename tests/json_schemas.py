"""Random JSON schemas for guided-decoding tests: nested objects, arrays, enums, required fields.

Every schema is bounded (enums, string maxLength, integer ranges, array maxItems, no extra properties), so even
a model with random weights reaches the end of one within a few hundred tokens.
"""

from __future__ import annotations

import random

_WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "on", "off", "yes", "no"]
MAX_TOKENS = 512        # enough for the largest schema below, one byte per token


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema with 1-3 properties, up to two levels of nested objects."""
    names = rng.sample(["id", "name", "tags", "size", "kind", "ok", "items", "meta"], rng.randint(1, 3))
    properties = {name: _value_schema(rng, depth) for name in names}
    required = [name for name in names if rng.random() < 0.7] or [names[0]]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _value_schema(rng: random.Random, depth: int) -> dict:
    kinds = ["integer", "enum", "string", "boolean", "array"] + (["object"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 200)}
    if kind == "enum":
        return {"enum": rng.sample(_WORDS, rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "minLength": 1, "maxLength": rng.randint(1, 4)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        item = rng.choice([{"type": "boolean"}, {"enum": rng.sample(_WORDS, 2)},
                           {"type": "integer", "minimum": 0, "maximum": 9}])
        return {"type": "array", "items": item, "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
    return random_schema(rng, depth + 1)


def random_schemas(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [random_schema(rng) for _ in range(count)]
