"""Load fmforge manifests from YAML files and validate them with the v1alpha1 models.

Used by `fmforge validate` and `fmforge run`. Every problem becomes a `ManifestError` that names
the file and line, the object, the field path in wire form (`spec.training.microBatchSize`) and
what is allowed there, so a user can fix the manifest without reading the schema.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from .v1alpha1 import API_VERSION, GROUP, MAX_NAME_LENGTH, NAME_PATTERN, kind_info
from .v1alpha1.common import Spec
from .v1alpha1.kinds import KIND_ORDER, KindInfo

_NAME_RE = re.compile(NAME_PATTERN)
_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "status")


@dataclass(frozen=True)
class ManifestError:
    """One problem in one manifest."""

    path: str
    line: int | None
    obj: str | None
    """`Kind/name` where known."""
    field: str | None
    """Field path in wire form, such as `spec.filters[1].threshold`."""
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        parts = [where]
        if self.obj:
            parts.append(self.obj)
        if self.field:
            parts.append(self.field)
        return ": ".join(parts) + ": " + self.message


@dataclass
class Manifest:
    """A valid fmforge object read from a file."""

    info: KindInfo
    name: str
    namespace: str
    spec: Spec
    raw: dict[str, Any]
    path: Path
    line: int

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def key(self) -> str:
        """`Kind/name`, the object's id in the local runner (one namespace at a time)."""
        return f"{self.info.kind}/{self.name}"

    @property
    def metadata(self) -> dict[str, Any]:
        return self.raw.get("metadata") or {}


@dataclass
class LoadResult:
    """What `load` found."""

    manifests: list[Manifest] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Documents that are not fmforge objects (another API group), as `path:line: kind`."""
    files: list[Path] = field(default_factory=list)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps the node tree so errors can point at a line."""


#: The most nodes a document may expand to once its aliases are followed. A real manifest has a
#: few hundred; the bound stops "billion laughs" alias bombs before anything is constructed
#: (go-yaml, which kubectl uses, refuses such documents as "excessive aliasing" too).
MAX_EXPANDED_NODES = 100_000
#: Kubernetes' limits on metadata (apimachinery's ObjectMeta validation) and on a whole object
#: (etcd's default request limit, which the API server answers with "request is too large").
MAX_ANNOTATIONS_BYTES = 256 * 1024
MAX_OBJECT_BYTES = 1536 * 1024
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
#: ObjectMeta's fields; anything else in metadata is an unknown field, as for kubectl.
_METADATA_FIELDS = ("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
                    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
                    "annotations", "ownerReferences", "finalizers", "managedFields")


def _tree_problems(node: yaml.Node) -> list[tuple[int, str]]:
    """Duplicate mapping keys and alias bombs in a composed document, as (line, message).

    Both are checked on the node tree, before anything is constructed: PyYAML would keep the
    last of two equal keys silently (kubectl refuses them) and would build every expansion of
    an alias bomb in memory."""
    problems: list[tuple[int, str]] = []
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in visiting:
            raise RecursionError
        visiting.add(id(n))
        total = 1
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen and k.tag != "tag:yaml.org,2002:merge":
                        problems.append((k.start_mark.line + 1, f"duplicate key {k.value!r}; it is already "
                                         f"defined at line {seen[k.value]} (kubectl refuses this too)"))
                    seen.setdefault(k.value, k.start_mark.line + 1)
                total += size(k) + size(v)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                total += size(v)
                if total > MAX_EXPANDED_NODES:
                    break
        visiting.discard(id(n))
        sizes[id(n)] = total
        return total

    try:
        total = size(node)
    except RecursionError:
        return [(node.start_mark.line + 1, "an alias refers to a node that contains it (a recursive "
                 "structure); a manifest must be a tree")]
    if total > MAX_EXPANDED_NODES:
        problems.append((node.start_mark.line + 1,
                         f"the document expands to more than {MAX_EXPANDED_NODES} values through YAML aliases "
                         f"(&anchor/*alias); refused as an alias bomb: write the values out"))
    return problems


def _qualified_key_problem(key: Any) -> str | None:
    """Why `key` is not a valid label or annotation key (Kubernetes' qualified name), or None."""
    if not isinstance(key, str) or not key:
        return "keys must be non-empty strings"
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return (f"key {key!r}: the prefix before '/' must be a DNS subdomain (lower-case letters, digits, "
                f"'-' and '.', at most 253 characters)")
    if len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return (f"key {key!r}: the name part must be at most 63 characters of letters, digits, '-', '_' or "
                f"'.', starting and ending with a letter or digit")
    return None


def _metadata_problems(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """What Kubernetes would reject in `metadata`, as (field path, message)."""
    out: list[tuple[str, str]] = []
    for key in meta:
        if key not in _METADATA_FIELDS:
            out.append((f"metadata.{key}", f"unknown field; allowed: {', '.join(_METADATA_FIELDS)}"))
    if meta.get("generateName") is not None:
        out.append(("metadata.generateName", "not supported: fmforge objects need a fixed metadata.name (the "
                    "local runner, lineage and references find objects by name)"))
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not _DNS1123_LABEL.match(ns)):
        out.append(("metadata.namespace", f"{ns!r} is not a valid namespace: a DNS-1123 label of at most 63 "
                    f"lower-case letters, digits and '-', starting and ending with a letter or digit"))
    out += _label_problems(meta.get("labels"))
    out += _annotation_problems(meta.get("annotations"))
    return out


def _label_problems(labels: Any) -> list[tuple[str, str]]:
    """What Kubernetes would reject in `metadata.labels`: keys, non-string values, value syntax."""
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [("metadata.labels", f"must be a mapping of strings (got {type(labels).__name__})")]
    out: list[tuple[str, str]] = []
    for k, v in labels.items():
        why = _qualified_key_problem(k)
        if why is None and not isinstance(v, str):
            why = f"value of {k!r} must be a string (got {type(v).__name__}); quote it"
        elif why is None and v and (len(v) > 63 or not _QUALIFIED_NAME.match(v)):
            why = (f"value of {k!r} must be at most 63 characters of letters, digits, '-', '_' or '.', "
                   f"starting and ending with a letter or digit")
        if why:
            out.append(("metadata.labels", why))
    return out


def _annotation_problems(annotations: Any) -> list[tuple[str, str]]:
    """What Kubernetes would reject in `metadata.annotations`: keys, non-string values, total size."""
    if annotations is None:
        return []
    if not isinstance(annotations, dict):
        return [("metadata.annotations", f"must be a mapping of strings (got {type(annotations).__name__})")]
    out: list[tuple[str, str]] = []
    total = 0
    for k, v in annotations.items():
        why = _qualified_key_problem(k)
        if why is None and not isinstance(v, str):
            why = f"value of {k!r} must be a string (got {type(v).__name__}); quote it"
        if why:
            out.append(("metadata.annotations", why))
        else:
            total += len(k.encode()) + len(v.encode())
    if total > MAX_ANNOTATIONS_BYTES:
        out.append(("metadata.annotations", f"too long: {total} bytes; Kubernetes allows at most "
                    f"{MAX_ANNOTATIONS_BYTES} bytes of annotations (keys and values) per object"))
    return out


def manifest_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[ManifestError]]:
    """Expand files and directories (recursively, *.yaml and *.yml) into a sorted file list."""
    files: list[Path] = []
    errors: list[ManifestError] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".yaml", ".yml") and q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                errors.append(ManifestError(str(p), None, None, None, "directory has no *.yaml or *.yml files"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(ManifestError(str(p), None, None, None, "no such file or directory"))
    return files, errors


def load(paths: Iterable[str | Path]) -> LoadResult:
    """Read and validate every fmforge manifest under `paths`."""
    result = LoadResult()
    files, result.errors = manifest_files(paths)
    result.files = files
    seen: dict[tuple[str, str, str], Manifest] = {}
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            result.errors.append(ManifestError(str(path), None, None, None, f"cannot read: {e}"))
            continue
        try:
            nodes = list(yaml.compose_all(text, Loader=_Loader))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark else None
            why = f"not valid YAML: {getattr(e, 'problem', e)}"
            result.errors.append(ManifestError(str(path), line, None, None, why))
            continue
        for node in nodes:
            if node is None:
                continue
            problems = _tree_problems(node)
            if problems:
                result.errors.extend(ManifestError(str(path), ln, None, None, msg) for ln, msg in problems)
                continue
            data = _Loader(text).construct_document(node)
            if data is None:
                continue
            m = _validate_document(path, node, data, result)
            if m is None:
                continue
            dup_key = (m.namespace, m.kind, m.name)
            if dup_key in seen:
                other = seen[dup_key]
                result.errors.append(
                    ManifestError(str(path), m.line, m.key, "metadata.name",
                                  f"duplicate object; also defined at {other.path}:{other.line}")
                )
                continue
            seen[dup_key] = m
            result.manifests.append(m)
    result.manifests.sort(key=lambda m: (KIND_ORDER.index(m.kind), m.name))
    return result


def _validate_document(path: Path, node: yaml.Node, data: Any, result: LoadResult) -> Manifest | None:
    """One YAML document as a Manifest, or None with its errors added to `result` (or, for another
    API group's object, its name added to `result.skipped`)."""
    line = node.start_mark.line + 1
    err = lambda obj, fld, msg, ln=line: result.errors.append(ManifestError(str(path), ln, obj, fld, msg))  # noqa: E731
    info = _fmforge_kind(path, node, data, result, err)
    if info is None:
        return None
    kind = data["kind"]
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    obj = f"{kind}/{name}" if isinstance(name, str) else kind
    ok = True
    for key in data:
        if key not in _TOP_LEVEL:
            err(obj, str(key), f"unknown field; allowed: {', '.join(_TOP_LEVEL)}", _line(node, [key]))
            ok = False
    if not isinstance(meta, dict):
        err(obj, "metadata", "required field is missing (it holds the object's name)")
        return None
    if not isinstance(name, str) or not name:
        err(obj, "metadata.name", "required field is missing")
        return None
    for fld, msg, at in _object_problems(data, meta, name, info):
        # `at` None: the problem is the whole object's, reported at the document's first line.
        err(obj, fld, msg, *([] if at is None else [_line(node, at)]))
        ok = False
    namespace = meta.get("namespace") or "default"
    spec = _validate_spec(path, node, data, info, obj, result)
    if spec is None or not ok:
        return None
    return Manifest(info=info, name=name, namespace=namespace, spec=spec, raw=data, path=path, line=line)


def _fmforge_kind(path: Path, node: yaml.Node, data: Any, result: LoadResult,
                  err: Callable[..., None]) -> KindInfo | None:
    """The kind of an fmforge object; None (with an error, or skipped if another API group's) otherwise."""
    line = node.start_mark.line + 1
    if not isinstance(data, dict):
        err(None, None, "a manifest must be a mapping with apiVersion, kind, metadata and spec")
        return None
    api_version, kind = data.get("apiVersion"), data.get("kind")
    if not isinstance(api_version, str) or not api_version:
        err(None, "apiVersion", f"required field is missing; fmforge objects use apiVersion {API_VERSION}")
        return None
    if api_version.split("/")[0] != GROUP:
        result.skipped.append(f"{path}:{line}: {api_version} {kind}")
        return None
    if api_version != API_VERSION:
        err(None, "apiVersion", f"unsupported version {api_version!r}; use {API_VERSION}", _line(node, ["apiVersion"]))
        return None
    try:
        info = kind_info(str(kind)) if isinstance(kind, str) else None
    except KeyError:
        info = None
    if info is None or info.kind != kind:
        err(None, "kind", f"unknown kind {kind!r}; allowed: {', '.join(KIND_ORDER)}", _line(node, ["kind"]))
        return None
    return info


def _object_problems(data: dict[str, Any], meta: dict[str, Any], name: str,
                     info: KindInfo) -> list[tuple[str | None, str, list[str] | None]]:
    """The name, metadata and size problems of an object, as (field, message, path of the field's
    line); a path of None for the object as a whole."""
    out: list[tuple[str | None, str, list[str] | None]] = []
    if len(name) > MAX_NAME_LENGTH:
        out.append(("metadata.name",
                    f"must be at most {MAX_NAME_LENGTH} characters (it has {len(name)}): child objects are named "
                    f"<name>-g<generation>-{info.stage} and must fit a 63-character DNS label",
                    ["metadata", "name"]))
    elif not _NAME_RE.match(name):
        out.append(("metadata.name",
                    "must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter and "
                    "ending with a letter or digit", ["metadata", "name"]))
    out += [(fld, msg, fld.split(".")) for fld, msg in _metadata_problems(meta)]
    size = len(json.dumps(data, default=str).encode())
    if size > MAX_OBJECT_BYTES:
        out.append((None, f"the object is {size} bytes; Kubernetes stores at most {MAX_OBJECT_BYTES} bytes per "
                    f"object: keep large data in files the spec points to", None))
    return out


def _validate_spec(path: Path, node: yaml.Node, data: dict[str, Any], info: KindInfo, obj: str,
                   result: LoadResult) -> Any:
    """The validated spec model, or None with an error per field that is wrong."""
    line = node.start_mark.line + 1
    if "spec" not in data or data["spec"] is None:
        result.errors.append(ManifestError(str(path), line, obj, "spec", "required field is missing"))
        return None
    try:
        return info.spec.model_validate(data["spec"])
    except ValidationError as e:
        for d in e.errors():
            fld, at = _field_path(info.spec, d["loc"], data["spec"])
            result.errors.append(
                ManifestError(str(path), _line(node, ["spec", *at]) or line, obj,
                              "spec" + fld, _message(d, info.spec, at, data["spec"]))
            )
        return None


# -- error rendering --------------------------------------------------------------------------------


def _field_path(model: type, loc: tuple[Any, ...], data: Any) -> tuple[str, list[Any]]:
    """Pydantic's loc as a wire-form path, dropping the discriminator tags pydantic inserts."""
    out, at = "", []
    cur = data
    for elem in loc:
        if isinstance(elem, int):
            out += f"[{elem}]"
            at.append(elem)
            cur = cur[elem] if isinstance(cur, list) and elem < len(cur) else None
        elif isinstance(cur, dict) and elem not in cur and cur.get("type") == elem:
            continue  # the tag of a discriminated union, not a field
        else:
            out += f".{elem}"
            at.append(elem)
            cur = cur.get(elem) if isinstance(cur, dict) else None
    return out, at


def _unwrap(tp: Any, data: Any) -> Any:
    """Strip Annotated/Optional and pick the variant of a discriminated union from the data."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
            tag = data.get("type") if isinstance(data, dict) else None
            for a in args:
                a0 = _unwrap(a, None)
                f = getattr(a0, "model_fields", {}).get("type")
                if f is not None and tag in typing.get_args(f.annotation):
                    return a0
            return None
        else:
            return tp


def _model_at(model: type, at: list[Any], data: Any) -> type | None:
    tp: Any = model
    cur = data
    for elem in at:
        tp = _unwrap(tp, cur)
        if isinstance(elem, int):
            args = typing.get_args(tp)
            if not args:
                return None
            tp = args[0]
            cur = cur[elem] if isinstance(cur, list) and elem < len(cur) else None
        else:
            fields = getattr(tp, "model_fields", None)
            if fields is None:
                return None
            match = [f for n, f in fields.items() if (f.alias or n) == elem]
            if not match:
                return None
            tp = match[0].annotation
            cur = cur.get(elem) if isinstance(cur, dict) else None
    tp = _unwrap(tp, cur)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _message(err: dict[str, Any], model: type, at: list[Any], data: Any) -> str:
    kind, msg = err["type"], err["msg"]
    value = err.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        parent = _model_at(model, at[:-1], data)
        if parent is not None:
            allowed = [f.alias or n for n, f in parent.model_fields.items()]
            return f"unknown field; allowed fields here: {', '.join(allowed)}"
        return "unknown field"
    if kind == "union_tag_invalid":
        return f"unknown type {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return "required field 'type' is missing; it says which variant this is"
    if kind in ("rule", "template"):  # messages that say everything, the value included
        return msg
    msg = msg.replace("Input should be", "must be").replace("String should", "must")
    msg = msg.replace("List should", "must").replace("Value error, ", "")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (got {type(value).__name__})"
    if not isinstance(value, (dict, list)):
        msg += f" (got {value!r})"
    return msg


def _line(node: yaml.Node, path: list[Any]) -> int | None:
    """Line of the deepest node along `path` in the YAML tree (1-based)."""
    cur, line = node, node.start_mark.line + 1
    for elem in path:
        nxt = None
        if isinstance(cur, yaml.MappingNode):
            for k, v in cur.value:
                if getattr(k, "value", None) == elem:
                    nxt, line = v, k.start_mark.line + 1
                    break
        elif isinstance(cur, yaml.SequenceNode) and isinstance(elem, int) and elem < len(cur.value):
            nxt = cur.value[elem]
            line = nxt.start_mark.line + 1
        if nxt is None:
            break
        cur = nxt
    return line
