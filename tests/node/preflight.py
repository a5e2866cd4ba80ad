"""Whether the node tier can run on this machine, asked before anything is built: by `make test`
(which builds the node's parts first when it can, so that their progress shows) and by the
tier's fixture (which skips, or in CI fails, with the same reason).

    python tests/node/preflight.py     prints why not and exits 1; exits 0 silently when it can

Three things are needed: root (containerd, kubelet, iptables), Go (kubelet, CoreDNS and KServe's
controller are built with it) and disk. The disk is the one reason CI skips for rather than fails:
a cold machine needs about 40 GB for the images (the runtime image is 7.7 GB in buildah's
storage and again unpacked in containerd's, beside pip's kept wheels and Go's caches), and a
machine with less says so and goes on with the other tiers instead of failing half-built.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("FMFORGE_CACHE", Path.home() / ".cache" / "fmforge"))
#: Free disk a cold build needs (nothing built yet); measured 2026-12-06: buildah's storage 8.5 GB
#: after one build, pip's kept wheels 3.4 GB, containerd's root 15.5 GB (the layers as imported
#: and unpacked), the Go module and build caches of kubelet, CoreDNS and KServe about 9 GB, and
#: the pods' volume and logs; rounded up.
COLD_GB = 40
#: Free disk once the images are built but not yet in the node's containerd (the state after
#: `make node`, which `make test` runs before the tier): the import and the pods.
BUILT_GB = 20
#: Free disk a warm start needs (the images built and imported before): a code change makes new
#: top layers and imports them again, a change of the runtime's dependencies a new 7.7 GB layer.
WARM_GB = 12
RUNTIME_IMAGE = os.environ.get("RUNTIME_IMAGE", "localhost/fmforge/runtime:dev")


@dataclass(frozen=True)
class Reason:
    """Why the node tier cannot run here."""

    text: str
    #: True where CI fails on it (a missing tool is the project's to install); False where CI skips
    #: too (a machine without the disk is not a defect of the change under test).
    fails_ci: bool


#: The node's containerd root, kept between runs, and beside it the marks of what was imported.
CONTAINERD_ROOT = CACHE / "node" / "containerd"
IMPORT_MARKS = CONTAINERD_ROOT / "fmforge-imported"


def import_mark(image: str) -> Path:
    """The file in which node.Node._import_images records the buildah image id it imported as `image`."""
    return IMPORT_MARKS / image.replace("/", "_").replace(":", "_")


def imported_before() -> bool:
    """The runtime image was imported into the node's containerd before."""
    return import_mark(RUNTIME_IMAGE).is_file()


def built() -> bool:
    """The runtime image is in build-images.sh's buildah storage (its image list, read as a file:
    buildah may not be installed yet)."""
    listing = CACHE / "containers" / "storage" / "overlay-images" / "images.json"
    try:
        return f'"{RUNTIME_IMAGE}"' in listing.read_text()
    except OSError:
        return False


def free_gb(path: Path = CACHE) -> float:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 2**30


def why_not() -> Reason | None:
    if sys.platform != "linux":
        return Reason("the node tier runs kubelet and containerd: it needs Linux", fails_ci=True)
    if os.geteuid() != 0:
        return Reason("the node tier runs containerd, kubelet and iptables: it needs root", fails_ci=True)
    if shutil.which("go") is None:
        return Reason("Go is not installed: the node tier builds kubelet, kube-proxy and CoreDNS with it",
                      fails_ci=True)
    if imported_before():
        need, state = WARM_GB, "the images built and imported before"
    elif built():
        need, state = BUILT_GB, "the images built, not yet imported into the node's containerd"
    else:
        need, state = COLD_GB, "nothing built yet"
    have = free_gb()
    if have < need:
        return Reason(f"the node tier needs {need} GB free under {CACHE} ({state}); {have:.1f} GB is free. "
                      f"Free disk (`tests/node/build-images.sh prune` drops old image layers) or set FMFORGE_CACHE "
                      f"to a larger disk", fails_ci=False)
    return None


if __name__ == "__main__":
    r = why_not()
    if r is not None:
        print(f"node tier: not here: {r.text}")
        sys.exit(1)
