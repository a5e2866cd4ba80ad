"""The operator's view of the cluster, kept current by kopf's watches.

Holds every fmforge object and every child fmforge labelled (RayJobs, InferenceServices), and a
reverse index of references, so that a producer becoming Ready queues exactly its consumers
(and a ModelCard's approval queues the Deployments of its model) without a request or a scan.
Reconcilers read it instead of the API server: a reconcile costs no GET.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..api.v1alpha1 import KINDS
from ..kube.names import LABEL_KIND, LABEL_NAME

#: (namespace, kind, name) of an fmforge object: the unit of work of the queue.
Key = tuple[str, str, str]


def key_of(obj: dict[str, Any]) -> Key:
    m = obj["metadata"]
    return (m.get("namespace") or "", obj["kind"], m["name"])


def _slim(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without managedFields, the largest part of most objects and never read here."""
    meta = obj.get("metadata") or {}
    if "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


_SPECS: OrderedDict[tuple[str, str, str, int], Any] = OrderedDict()
_SPECS_MAX = 8192


def spec_of(obj: dict[str, Any]) -> Any:
    """The validated spec model of `obj`; raises ValueError for an invalid spec.

    Validated once per object and generation (the API server bumps the generation on every spec
    change): every status write and child event brings the same spec back, and validation is
    most of what a reconcile costs the operator's CPU."""
    m = obj["metadata"]
    key = (obj["kind"], m.get("namespace") or "", m.get("uid") or m["name"], int(m.get("generation") or 0))
    hit = _SPECS.get(key)
    if hit is None:
        try:
            hit = KINDS[obj["kind"]].spec.model_validate(obj.get("spec") or {})
        except ValueError as e:
            hit = e
        _SPECS[key] = hit
        if len(_SPECS) > _SPECS_MAX:
            _SPECS.popitem(last=False)
    else:
        _SPECS.move_to_end(key)
    if isinstance(hit, ValueError):
        raise hit
    return hit


def edges(obj: dict[str, Any]) -> set[tuple[str, str]]:
    """What `obj` reads, as (kind, name) in its namespace: its references, and for a Deployment
    that requires an approved card, the pseudo-kind `ModelCardOf` of its model."""
    info = KINDS[obj["kind"]]
    try:
        spec = spec_of(obj)
    except ValueError:
        return set()  # an invalid spec reads nothing; its reconcile reports why
    out = {(r.kind, r.name) for r in info.references(spec)}
    if obj["kind"] == "Deployment" and spec.require_approved_model_card:
        out.add(("ModelCardOf", f"{spec.model_ref.kind}/{spec.model_ref.name}"))
    return out


@dataclass
class World:
    """The fmforge objects of one namespace, as the pure decide functions see them."""

    objects: dict[tuple[str, str], dict[str, Any]]

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def cards_for(self, model_kind: str, model_name: str) -> list[dict[str, Any]]:
        """The ModelCards that evaluate `model_kind/model_name`, by name."""
        out = []
        for (kind, _), obj in sorted(self.objects.items()):
            ref = (obj.get("spec") or {}).get("modelRef") or {}
            if kind == "ModelCard" and ref.get("name") == model_name and ref.get("kind", "TrainingRun") == model_kind:
                out.append(obj)
        return out


class Store:
    """fmforge objects and their children by key, with the reverse reference index."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self._children: dict[Key, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
        self._edges: dict[Key, set[tuple[str, str]]] = {}
        self._readers: dict[tuple[str, str, str], set[Key]] = defaultdict(set)

    # -- fmforge objects ---------------------------------------------------------------------------
    def put(self, obj: dict[str, Any]) -> list[Key]:
        """Record `obj`; the keys to reconcile because of it (itself and whoever reads it)."""
        key = key_of(obj)
        ns, kind, name = key
        self._objects[ns][(kind, name)] = _slim(obj)
        new = edges(obj)
        old = self._edges.get(key, set())
        for e in old - new:
            self._readers[(ns, *e)].discard(key)
        for e in new - old:
            self._readers[(ns, *e)].add(key)
        self._edges[key] = new
        return [key, *self.readers_of(obj)]

    def update(self, obj: dict[str, Any]) -> None:
        """Record a newer copy of `obj` (a response of our own write), queueing nothing."""
        ns, kind, name = key_of(obj)
        if (kind, name) in self._objects[ns]:
            self._objects[ns][(kind, name)] = _slim(obj)

    def remove(self, obj: dict[str, Any]) -> list[Key]:
        key = key_of(obj)
        ns, kind, name = key
        self._objects[ns].pop((kind, name), None)
        for e in self._edges.pop(key, set()):
            self._readers[(ns, *e)].discard(key)
        self._children.pop(key, None)
        return self.readers_of(obj)

    def readers_of(self, obj: dict[str, Any]) -> list[Key]:
        ns, kind, name = key_of(obj)
        out = set(self._readers.get((ns, kind, name), ()))
        if kind == "ModelCard":
            ref = (obj.get("spec") or {}).get("modelRef") or {}
            out |= self._readers.get((ns, "ModelCardOf", f"{ref.get('kind', 'TrainingRun')}/{ref.get('name')}"), set())
        return sorted(out)

    def get(self, key: Key) -> dict[str, Any] | None:
        ns, kind, name = key
        return self._objects.get(ns, {}).get((kind, name))

    def world(self, namespace: str) -> World:
        return World(self._objects.get(namespace, {}))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for objs in list(self._objects.values()):
            yield from list(objs.values())

    # -- children ----------------------------------------------------------------------------------
    @staticmethod
    def owner_of(child: dict[str, Any]) -> Key | None:
        """The fmforge object a child belongs to, from its labels."""
        lb = (child.get("metadata") or {}).get("labels") or {}
        if lb.get(LABEL_KIND) in KINDS and lb.get(LABEL_NAME):
            return (child["metadata"].get("namespace") or "", lb[LABEL_KIND], lb[LABEL_NAME])
        return None

    def put_child(self, child: dict[str, Any]) -> Key | None:
        """Record a child; the key of its owner, to reconcile."""
        owner = self.owner_of(child)
        if owner is not None:
            self._children[owner][(child["kind"], child["metadata"]["name"])] = _slim(child)
        return owner

    def remove_child(self, child: dict[str, Any]) -> Key | None:
        owner = self.owner_of(child)
        if owner is not None and owner in self._children:
            self._children[owner].pop((child["kind"], child["metadata"]["name"]), None)
        return owner

    def children(self, key: Key) -> list[dict[str, Any]]:
        return list(self._children.get(key, {}).values())
