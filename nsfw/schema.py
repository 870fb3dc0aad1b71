"""The profile format as a JSON Schema, for editors (yaml-language-server completes and checks as you type).

Built from the definitions the validator itself uses (nsfw.profile: keys, zones, protocols, choices, defaults,
descriptions, the label grammar), so the two cannot drift apart. What a schema cannot say (a CIDR with host
bits set, an include that is missing or cycles, a `remove:` that matches nothing, the lines of a list file),
only `nsfw check` says.
"""

from __future__ import annotations

from typing import Any

from . import profile as p

SCHEMA_ID = "https://nsfw.invalid/schema/profile-v1.json"
PORT_TEXT = r"^\s*[0-9]{1,5}\s*(-\s*[0-9]{1,5}\s*)?$"
IPV4 = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}"
V4_NET = rf"({IPV4})(/([0-9]|[12][0-9]|3[0-2]))?"
V6_NET = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/([0-9]{1,2}|1[01][0-9]|12[0-8]))?"
CIDR = rf"^\s*({V4_NET}|{V6_NET})\s*$"
NAME = rf"^\s*(\*\.)?({p.LABEL_PATTERN}\.)+{p.LABEL_PATTERN}\.?\s*$"


def _describe(key: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": p.DESCRIPTIONS[key], **schema}


def _rule() -> dict[str, Any]:
    ports = {"type": "array", "minItems": 1, "items": {"oneOf": [
        {"type": "integer", "minimum": 1, "maximum": 65535},
        {"type": "string", "pattern": PORT_TEXT}]}}
    targets: dict[str, dict[str, Any]] = {
        "zone": {"enum": list(p.ZONES)},
        "cidr": {"type": "string", "pattern": CIDR},
        "host": {"type": "string", "pattern": NAME},
        "file": {"type": "string", "minLength": 1},
    }
    mapping = {
        "type": "object",
        "additionalProperties": False,
        "properties": {**{k: _describe(k, v) for k, v in targets.items()},
                       "ports": _describe("ports", {"oneOf": [ports, ports["items"]]}),
                       "proto": _describe("proto", {"enum": list(p.PROTOS)})},
        "oneOf": [{"required": [k]} for k in p.TARGET_KEYS],
        # ICMP has no ports
        "if": {"properties": {"proto": {"const": "icmp"}}, "required": ["proto"]},
        "then": {"not": {"required": ["ports"]}},
    }
    text = {"type": "string", "anyOf": [{"enum": list(p.ZONES)}, {"pattern": CIDR}, {"pattern": NAME}]}
    return {"oneOf": [text, mapping]}


def json_schema() -> dict[str, Any]:
    rules = {"type": ["array", "null"], "items": {"$ref": "#/$defs/rule"}}
    names = {"oneOf": [{"type": "string", "minLength": 1},
                       {"type": "array", "items": {"type": "string", "minLength": 1}}]}
    top: dict[str, Any] = {
        "version": {"const": 1},
        "description": {"type": "string"},
        "include": names,
        "command": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1,
                                                   "items": {"type": ["string", "integer"]}}]},
        "network": {"enum": list(p.CHOICES["network"]), "default": p.DEFAULTS["network"]},
        "default": {"enum": list(p.CHOICES["default"]), "default": p.DEFAULTS["default"]},
        "allow": rules,
        "deny": rules,
        "remove": {"type": "object", "additionalProperties": False,
                   "properties": {"allow": rules, "deny": rules}},
        "ipv6": {"type": "boolean", "default": p.DEFAULTS["ipv6"]},
        # YAML 1.1 reads a bare `off` as false
        "log": {"enum": [*p.CHOICES["log"], False], "default": p.DEFAULTS["log"]},
    }
    assert set(top) == set(p.TOP_KEYS), "the schema and the validator must know the same keys"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "nsfw profile, format version 1",
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": {k: _describe(k, v) for k, v in top.items()},
        "$defs": {"rule": _rule()},
    }
