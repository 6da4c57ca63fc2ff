"""A small JSON-schema validator: the subset tool arguments and llm outputs need.

Supported keywords: type (a name or a list of names), enum, const, properties, required,
additionalProperties (bool or schema), items, minItems, maxItems, minLength, maxLength, minimum,
maximum, anyOf. Unknown keywords are ignored, as JSON Schema does, so a richer schema still works
where it overlaps. We validate ourselves rather than depend on `jsonschema` for a few dozen lines.
"""

from __future__ import annotations

from typing import Any

from loom.agent.errors import SchemaError

SUPPORTED_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def _is_type(value: Any, name: str) -> bool:
    # bool is an int in Python but not a number in JSON.
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "integer":
        # Stricter than JSON Schema (which accepts 3.0): a tool annotated `int` must get an int.
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    raise SchemaError(f"unsupported type {name!r} in schema (use one of {SUPPORTED_TYPES})")


def validate(value: Any, schema: dict, path: str = "$") -> None:
    """Raise SchemaError (with the path of the first offending part) if value does not match schema."""
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be an object, got {type(schema).__name__}", path)
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                validate(value, option, path)
                break
            except SchemaError as e:
                errors.append(str(e))
        else:
            raise SchemaError(f"matches none of anyOf ({'; '.join(errors)})", path)
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, name) for name in names):
            raise SchemaError(f"expected {' or '.join(names)}, got {type(value).__name__}", path)
    if "const" in schema and value != schema["const"]:
        raise SchemaError(f"must be {schema['const']!r}", path)
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"must be one of {schema['enum']!r}, got {value!r}", path)
    if isinstance(value, dict):
        _validate_object(value, schema, path)
    elif isinstance(value, list):
        _validate_array(value, schema, path)
    elif isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise SchemaError(f"must be at least {schema['minLength']} characters", path)
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise SchemaError(f"must be at most {schema['maxLength']} characters", path)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaError(f"must be >= {schema['minimum']}, got {value}", path)
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaError(f"must be <= {schema['maximum']}, got {value}", path)


def _validate_object(value: dict, schema: dict, path: str) -> None:
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            raise SchemaError(f"missing required property {name!r}", path)
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            validate(item, properties[name], f"{path}.{name}")
        elif extra is False:
            allowed = ", ".join(sorted(properties)) or "none"
            raise SchemaError(f"unexpected property {name!r} (allowed: {allowed})", path)
        elif isinstance(extra, dict):
            validate(item, extra, f"{path}.{name}")


def _validate_array(value: list, schema: dict, path: str) -> None:
    if len(value) < schema.get("minItems", 0):
        raise SchemaError(f"must have at least {schema['minItems']} items, got {len(value)}", path)
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise SchemaError(f"must have at most {schema['maxItems']} items, got {len(value)}", path)
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            validate(item, items, f"{path}[{i}]")
