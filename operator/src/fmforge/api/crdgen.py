"""Generate the CustomResourceDefinitions in `crds/` from the pydantic models.

`fmforge crds` calls `write_crds`; the drift test calls `render_crds` and compares. Pydantic's
JSON Schema is turned into the structural OpenAPI v3 subset the API server accepts: references
inlined, `Optional` unwrapped, `const` made an enum, exclusive bounds in OpenAPI 3.0 form,
discriminated unions flattened into one object whose per-type fields are guarded by CEL rules,
defaults kept on scalars only (an object default would be expanded by the API server and trip
the "only one of" rules), and the models' cross-field `Rule`s written as `x-kubernetes-validations`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .v1alpha1 import GROUP, KIND_ORDER, KINDS, MAX_NAME_LENGTH, NAME_PATTERN, VERSION
from .v1alpha1.kinds import KindInfo

_KEEP = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "format",
    "additionalProperties",
    "nullable",
    "anyOf",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
}
_SCALARS = {"string", "integer", "number", "boolean"}


class SchemaError(ValueError):
    """The models produced a schema the generator cannot make structural."""


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    s = dict(schema)
    resolved = _resolve(s, defs)
    if resolved is not None:
        return resolved
    out = _keywords(s)
    _structural_children(out, s, defs)
    _drop_unstructural(out)
    return out


def _resolve(s: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any] | None:
    """The structural node of a reference, a one-element allOf, an optional value or a discriminated
    union; None for a node that is none of these."""
    if "$ref" in s:
        target = defs[s.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in s.items() if k in ("description", "default")}}
        return structural(merged, defs)
    if "allOf" in s and len(s["allOf"]) == 1:
        inner = s.pop("allOf")[0]
        return structural({**inner, **s}, defs)
    if "anyOf" in s and not s.get("x-kubernetes-int-or-string"):
        options = [o for o in s["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"cannot make a structural schema of anyOf {s['anyOf']}")
        rest = {k: v for k, v in s.items() if k != "anyOf"}
        if rest.get("default", ...) is None:
            rest.pop("default")
        return structural({**options[0], **rest}, defs)
    if "oneOf" in s and "discriminator" in s:
        return _flatten_union(s, defs)
    return None


def _keywords(s: dict[str, Any]) -> dict[str, Any]:
    """The keywords of `s` a structural schema keeps, in OpenAPI v3's spelling."""
    out: dict[str, Any] = {}
    if "const" in s:
        out["enum"] = [s["const"]]
    for key, value in s.items():
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "uniqueItems":
            out.setdefault("x-kubernetes-list-type", "set")
        elif key in _KEEP:
            out[key] = copy.deepcopy(value)
    return out


def _structural_children(out: dict[str, Any], s: dict[str, Any], defs: dict[str, Any]) -> None:
    """Make the properties, map values and items of `out` structural too; an object with neither
    properties nor a value schema keeps whatever it is given."""
    if "properties" in out:
        out["type"] = "object"
        out["properties"] = {k: structural(v, defs) for k, v in out["properties"].items()}
        if s.get("additionalProperties") is False:
            out.pop("additionalProperties", None)
    elif isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(out["additionalProperties"], defs)
    elif out.get("type") == "object" and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in out:
        out["items"] = structural(out["items"], defs)


def _drop_unstructural(out: dict[str, Any]) -> None:
    """Drop what the API server refuses: unknown formats, non-scalar defaults, sets of objects."""
    if "format" in out and out["format"] not in ("date-time", "int32", "int64", "double", "float"):
        out.pop("format")
    if "default" in out and not _is_scalar_default(out):
        out.pop("default")
    if (out.get("type") == "array" and out.get("x-kubernetes-list-type") == "set"
            and out.get("items", {}).get("type") not in _SCALARS):
        out.pop("x-kubernetes-list-type")


def _is_scalar_default(node: dict[str, Any]) -> bool:
    if node.get("type") in _SCALARS or node.get("x-kubernetes-int-or-string"):
        return True
    if node.get("type") == "array":
        return node.get("items", {}).get("type") in _SCALARS and node["default"] == []
    return False


def _strip_defaults(node: dict[str, Any]) -> dict[str, Any]:
    node = {k: v for k, v in node.items() if k != "default"}
    if "properties" in node:
        node["properties"] = {k: _strip_defaults(v) for k, v in node["properties"].items()}
    if "items" in node:
        node["items"] = _strip_defaults(node["items"])
    return node


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One schema for a field two union variants declare differently: what both allow.

    Bounds that only one variant has (a pattern, an enum, a range) are dropped here and put back
    as rules guarded by the type; size limits take the larger one, so CEL cost stays bounded.
    """
    out = {k: v for k, v in a.items() if k in ("type", "description", "x-kubernetes-list-type")}
    for key in ("maxItems", "maxLength"):
        if key in a and key in b:
            out[key] = max(a[key], b[key])
    for key in ("minItems", "minLength"):
        if key in a and key in b:
            out[key] = min(a[key], b[key])
    for key in ("pattern", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in a and a.get(key) == b.get(key):
            out[key] = a[key]
    if "items" in a and "items" in b:
        out["items"] = _merge(a["items"], b["items"])
    return out


def _flatten_union(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A discriminated union as one structural object.

    Structural schemas cannot branch on a discriminator, so the variants' properties are
    merged; CEL rules then say which fields belong to which type, which fields a type
    requires, and the variants' own rules and item patterns, each guarded by the type.
    """
    disc = schema["discriminator"]["propertyName"]
    variants: list[tuple[str, dict[str, Any]]] = []
    for option in schema["oneOf"]:
        v = structural(option, defs)
        tag = v["properties"][disc]["enum"][0]
        variants.append((tag, v))
    props, owners, rules = _merge_variants(variants, disc)
    rules += _pattern_rules(variants, props, disc)
    for name, tags in owners.items():
        if len(tags) < len(variants):
            allowed = ", ".join(f"'{t}'" for t in tags)
            rules.append(
                {
                    "rule": f"!has(self.{name}) || self.{disc} in [{allowed}]",
                    "message": f"{name} applies to {disc} {' or '.join(tags)} only",
                }
            )
    tags = [t for t, _ in variants]
    out: dict[str, Any] = {
        "type": "object",
        "required": [disc],
        "properties": {disc: {"type": "string", "enum": tags, "description": f"One of {', '.join(tags)}."}}
        | props,
        "x-kubernetes-validations": rules,
    }
    if "description" in schema:
        out["description"] = schema["description"]
    return out


def _merge_variants(
    variants: list[tuple[str, dict[str, Any]]], disc: str
) -> tuple[dict[str, Any], dict[str, list[str]], list[dict[str, Any]]]:
    """The union's merged properties, the variants each property belongs to, and each variant's
    own rules and required fields as rules guarded by its type."""
    props: dict[str, Any] = {}
    owners: dict[str, list[str]] = {}
    rules: list[dict[str, Any]] = []
    for tag, v in variants:
        for name, prop in v["properties"].items():
            if name == disc:
                continue
            prop = _strip_defaults(prop)
            owners.setdefault(name, []).append(tag)
            if name not in props:
                props[name] = prop
            elif props[name] != prop:
                props[name] = _merge(props[name], prop)
        for rule in v.get("x-kubernetes-validations", []):
            rules.append({**rule, "rule": f"self.{disc} != '{tag}' || ({rule['rule']})"})
        for name in v.get("required", []):
            if name != disc:
                rules.append(
                    {
                        "rule": f"self.{disc} != '{tag}' || has(self.{name})",
                        "message": f"a {tag} {disc} needs {name}",
                    }
                )
    return props, owners, rules


def _pattern_rules(variants: list[tuple[str, dict[str, Any]]], props: dict[str, Any],
                   disc: str) -> list[dict[str, Any]]:
    """Where a field's schema was loosened by the merge, each variant's pattern as a rule."""
    rules: list[dict[str, Any]] = []
    for tag, v in variants:
        for name, prop in v["properties"].items():
            if name == disc or props[name] == _strip_defaults(prop):
                continue
            pattern = prop.get("pattern") or prop.get("items", {}).get("pattern")
            guard = f"self.{disc} != '{tag}' || !has(self.{name})"
            if pattern and prop.get("type") == "array":
                rules.append(
                    {
                        "rule": f"{guard} || self.{name}.all(x, x.matches('{pattern}'))",
                        "message": f"{name} of a {tag} {disc} must match {pattern}",
                    }
                )
            elif pattern:
                rules.append(
                    {
                        "rule": f"{guard} || self.{name}.matches('{pattern}')",
                        "message": f"{name} of a {tag} {disc} must match {pattern}",
                    }
                )
    return rules


def _schema_of(model: type, mode: str) -> dict[str, Any]:
    js = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[attr-defined]
    return structural(js, js.get("$defs", {}))


def crd_for(info: KindInfo) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    spec_schema = _schema_of(info.spec, "validation")
    status_schema = _schema_of(info.status, "serialization")
    root = {
        "type": "object",
        "description": info.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Only name may be typed here; its bound keeps the CEL cost of the name rules small.
            "metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 253}}},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters: child objects are "
                f"named <name>-g<generation>-{info.stage} and must fit a 63-character DNS label",
            },
            {
                "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
                "message": "metadata.name must be a DNS-1035 label: lower-case letters, digits and '-', "
                "starting with a letter and ending with a letter or digit",
            },
        ],
    }
    columns = [
        {"name": c.name, "type": c.type, "jsonPath": c.json_path}
        | ({"description": c.description} if c.description else {})
        | ({"priority": c.priority} if c.priority else {})
        for c in info.columns
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "fmforge"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": ["fmforge"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


_HEADER = (
    "# Generated by `fmforge crds` from the models in operator/src/fmforge/api/v1alpha1.\n"
    "# Do not edit: change the models and run `make crds`.\n"
)


def render_crds() -> dict[str, str]:
    """File name → YAML text of every CRD, in pipeline order."""
    out = {}
    for kind in KIND_ORDER:
        info = KINDS[kind]
        text = yaml.safe_dump(crd_for(info), sort_keys=False, width=100, allow_unicode=True)
        out[f"{GROUP}_{info.plural}.yaml"] = _HEADER + "---\n" + text
    return out


def write_crds(directory: Path) -> list[Path]:
    """Write the CRDs into `directory`, removing stale generated files; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    rendered = render_crds()
    for old in directory.glob(f"{GROUP}_*.yaml"):
        if old.name not in rendered:
            old.unlink()
    paths = []
    for name, text in rendered.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(path)
    return paths


__all__ = ["render_crds", "write_crds", "crd_for", "structural"]
