"""`make node-up`: the node with fmforge installed (tests/node/platform_.py), for people.

Builds whatever is missing, starts the node, installs the chart, KubeRay and the claim
`fmforge-data` holding the quickstart corpus, prints `export KUBECONFIG=...` on a line of its own,
and runs until Ctrl-C or SIGTERM, which stop everything it started.

    python tests/node/up.py [--corpus-files N]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node as N  # noqa: E402
import platform_ as P  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-files", type=int, default=0,
                    help="files of each kind in the corpus (default 0: the quickstart's whole corpus)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    node = N.Node()
    try:
        node.start()
        plat = P.install(node, corpus_files=args.corpus_files or None)
        took = {**node.timings, **plat.timings}
        print(f"Node {N.NODE_NAME} up in {time.monotonic() - t0:.0f}s: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in took.items()), flush=True)
        print(f"export KUBECONFIG={node.kubeconfig}", flush=True)
        print(f"kubectl: {node.cp.kubectl_path}    namespace: {P.WORK_NS} (claim {P.CLAIM}: "
              f"{plat.pv_dir})    logs: {node.workdir}/*.log    Ctrl-C stops it", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001
        print(f"the node did not start: {e}", file=sys.stderr)
        return 1
    finally:
        print("Stopping the node...", file=sys.stderr, flush=True)
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
