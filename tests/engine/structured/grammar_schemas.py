"""The JSON schemas every structured-output walk must satisfy: objects, nested arrays, enums, anyOf, patterns,
numeric bounds, required/optional, $ref/$defs, formats. Written here, not generated."""

from __future__ import annotations

_ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 12},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"enum": ["FR", "DE", "US"]},
    },
    "required": ["street", "zip"],
}

SCHEMAS: dict[str, dict] = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "empty_object": {"type": "object", "properties": {}, "additionalProperties": False},
    "flat_object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "number"}},
        "required": ["b"],
        "additionalProperties": False,
    },
    "closed_object": {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["x", "y"],
        "additionalProperties": False,
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "email": {"type": "string", "format": "email"}},
                "required": ["id", "email"],
            }
        },
        "required": ["user"],
    },
    "array_of_ints": {"type": "array", "items": {"type": "integer"}},
    "array_bounds": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "nested_arrays": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
        "maxItems": 3,
    },
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"type": "string", "maxLength": 6}, "v": {"type": "number"}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
    },
    "tuple": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "items": False,
        "minItems": 3,
    },
    "string_enum": {"enum": ["red", "green", "blue"]},
    "mixed_enum": {"enum": [1, "two", None, True, 3.5]},
    "const": {"const": "fixed"},
    "object_const": {
        "type": "object",
        "properties": {"version": {"const": 2}, "kind": {"const": "event"}},
        "required": ["version", "kind"],
    },
    "enum_property": {
        "type": "object",
        "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"],
        "additionalProperties": False,
    },
    "any_of_scalars": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "integer"}, {"type": "null"}]},
    "any_of_objects": {
        "anyOf": [
            {
                "type": "object",
                "properties": {"cat": {"type": "string"}},
                "required": ["cat"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"dog": {"type": "integer"}},
                "required": ["dog"],
                "additionalProperties": False,
            },
        ]
    },
    "one_of": {"oneOf": [{"type": "boolean"}, {"type": "string", "pattern": "^[A-Z]{2}$"}]},
    "type_list": {"type": ["string", "integer", "null"]},
    "nullable_property": {
        "type": "object",
        "properties": {"maybe": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["maybe"],
    },
    "pattern_simple": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    "pattern_phone": {"type": "string", "pattern": "^\\+?[0-9]{2,3} [0-9]{3}-[0-9]{4}$"},
    "pattern_alternation": {"type": "string", "pattern": "^(yes|no|maybe)!?$"},
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 8},
    "int_bounds": {"type": "integer", "minimum": -5, "maximum": 17},
    "int_exclusive": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    "number_bounds": {"type": "number", "minimum": 0.5, "maximum": 2.5},
    "number_negative": {"type": "number", "maximum": -1},
    "large_int_bounds": {"type": "integer", "minimum": 1000, "maximum": 1000000},
    "format_date": {"type": "string", "format": "date"},
    "format_uuid": {"type": "string", "format": "uuid"},
    "format_ipv4": {"type": "string", "format": "ipv4"},
    "defs_ref": {
        "$defs": {"address": _ADDRESS},
        "type": "object",
        "properties": {"home": {"$ref": "#/$defs/address"}, "work": {"$ref": "#/$defs/address"}},
        "required": ["home"],
    },
    "definitions_ref": {
        "definitions": {
            "point": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
        },
        "type": "array",
        "items": {"$ref": "#/definitions/point"},
        "maxItems": 4,
    },
    "recursive_ref": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["value"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string", "maxLength": 4}}, "required": ["b"]},
        ]
    },
    "pydantic_like": {
        "$defs": {
            "Step": {
                "properties": {
                    "tool": {"enum": ["search", "calculator", "finish"], "title": "Tool", "type": "string"},
                    "input": {"title": "Input", "type": "string", "maxLength": 30},
                },
                "required": ["tool", "input"],
                "title": "Step",
                "type": "object",
            }
        },
        "properties": {
            "goal": {"title": "Goal", "type": "string"},
            "steps": {"items": {"$ref": "#/$defs/Step"}, "title": "Steps", "type": "array", "maxItems": 3},
            "confidence": {"default": 0.5, "title": "Confidence", "type": "number"},
        },
        "required": ["goal", "steps"],
        "title": "Plan",
        "type": "object",
    },
    "open_auto_glm_action": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "action": {"const": "do"},
                    "name": {"enum": ["Tap", "Type", "Swipe", "Back", "Home", "Launch"]},
                    "element": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 999},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
                "required": ["action", "name"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"action": {"const": "finish"}, "message": {"type": "string", "maxLength": 40}},
                "required": ["action", "message"],
                "additionalProperties": False,
            },
        ]
    },
    "map_of_ints": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    # llguidance bounds the property count only when every listed property is required.
    "min_max_properties": {
        "type": "object",
        "properties": {"p": {"type": "integer"}, "q": {"type": "integer"}},
        "required": ["p", "q"],
        "additionalProperties": {"type": "boolean"},
        "minProperties": 3,
        "maxProperties": 4,
    },
    "weather_tool_args": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
    "unicode_keys": {
        "type": "object",
        "properties": {"naïve": {"type": "string"}, "日本": {"type": "integer"}},
        "required": ["naïve", "日本"],
    },
}
