"""References resolved against the operator's view: ready, waiting (and for what), or a cycle.

Pure functions over the wire-form objects of one namespace (`store.World`), used by every
reconciler before it starts an attempt. A producer is ready when its status says so for its
current generation (phase Succeeded or Ready, `observedGeneration` equal to `generation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..api.status import is_done
from ..api.v1alpha1 import KINDS, Reference
from .store import World, spec_of


def is_ready(obj: dict[str, Any]) -> bool:
    """Whether `obj`'s output is usable: done for its current generation."""
    return is_done(obj.get("status"), obj["metadata"].get("generation"))


@dataclass
class Resolution:
    """What the references of one object came to."""

    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`Kind/name` → the producer's status, for the plan (only when nothing waits)."""
    waiting: list[str] = field(default_factory=list)
    """One line per reference that is not usable yet, naming the producer and what it lacks."""
    missing: bool = False
    """Whether a producer does not exist at all (the Event is a Warning: maybe a typo)."""
    cycle: str | None = None
    """`A -> B -> A` when the references lead back to the object itself."""


def _refs(obj: dict[str, Any]) -> list[Reference]:
    info = KINDS[obj["kind"]]
    try:
        return info.references(spec_of(obj))
    except ValueError:
        return []


def find_cycle(obj: dict[str, Any], world: World) -> str | None:
    """The chain of references from `obj` back to itself, if there is one."""
    start = (obj["kind"], obj["metadata"]["name"])

    def walk(node: tuple[str, str], path: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
        target = obj if node == start else world.get(*node)
        if target is None:
            return None
        for r in _refs(target):
            nxt = (r.kind, r.name)
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = walk(nxt, [*path, nxt])
                if found:
                    return found
        return None

    chain = walk(start, [start])
    return " -> ".join(f"{k}/{n}" for k, n in chain) if chain else None


def resolve(obj: dict[str, Any], world: World) -> Resolution:
    """Resolve the references of `obj`."""
    out = Resolution()
    out.cycle = find_cycle(obj, world)
    if out.cycle:
        return out
    for ref in _refs(obj):
        key = f"{ref.kind}/{ref.name}"
        target = world.get(ref.kind, ref.name)
        if target is None:
            out.missing = True
            out.waiting.append(f"{key}, which does not exist (create it, or fix {ref.field})")
            continue
        st = target.get("status") or {}
        if not is_ready(target):
            out.waiting.append(f"{key} ({st.get('phase') or 'Pending'})")
            continue
        if ref.tag and ref.tag not in (st.get("tags") or []):
            out.waiting.append(f"{key} to publish a version tagged {ref.tag!r} (its tags: {st.get('tags') or []})")
            continue
        out.inputs[key] = st
    if out.waiting:
        out.inputs = {}
    return out
