"""Deterministic names, labels and owner references of the child objects fmforge creates.

Children are named `<name>-g<generation>-<stage>` before anything is created, so a restarted
operator finds what it made instead of making it twice. The CRDs cap `metadata.name` at
`MAX_NAME_LENGTH` so that every child name fits a 63-character DNS label.
"""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import API_VERSION, KINDS, MAX_NAME_LENGTH

DNS_LABEL_MAX = 63
LABEL_KIND = "fmforge.io/kind"
LABEL_NAME = "fmforge.io/name"
LABEL_GENERATION = "fmforge.io/generation"
#: The model digest an InferenceService serves, and a ModelCard's RayJob was planned to evaluate.
ANNOTATION_MODEL_DIGEST = "fmforge.io/model-digest"


def child_name(name: str, generation: int, stage: str) -> str:
    """`<name>-g<generation>-<stage>`; raises ValueError when it would not fit a DNS label."""
    out = f"{name}-g{generation}-{stage}"
    if len(out) > DNS_LABEL_MAX:
        raise ValueError(
            f"child name {out!r} is {len(out)} characters, over the DNS label limit of {DNS_LABEL_MAX}; "
            f"names are limited to {MAX_NAME_LENGTH} characters"
        )
    return out


def child_name_for(kind: str, name: str, generation: int) -> str:
    """The child name of an object of `kind`, with its stage suffix."""
    return child_name(name, generation, KINDS[kind].stage)


def labels(kind: str, name: str, generation: int) -> dict[str, str]:
    """Labels every child carries, so `kubectl get -l fmforge.io/name=…` finds them."""
    return {
        LABEL_KIND: kind,
        LABEL_NAME: name,
        LABEL_GENERATION: str(generation),
        "app.kubernetes.io/managed-by": "fmforge",
    }


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """An owner reference to the fmforge object `obj`, so deleting it deletes its children."""
    meta = obj["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
