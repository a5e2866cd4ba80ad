"""Run the DataPile in DIR on a Ray cluster of three nodes simulated on this machine, losing one
node half-way; print what happened as one JSON line. A process of its own: Ray does not attach a
process to a second cluster after a first (the objects' owner is reported dead), and the test
session has started its local Ray before.

    python tests/stages/cluster_run.py DIR

Three nodes of one CPU and an 80 MiB object store each (`ray.cluster_utils.Cluster`: a raylet and
an object store per node); the head spills anything above 1% of a store, in batches of any size,
and every task result goes to the object store, as in a RayJob. The run attaches through
RAY_ADDRESS, as in a RayJob. Before fuzzy dedup, when every piece is processed and held in the
stores (some spilled), one node other than the driver's is killed: its objects are rebuilt by Ray
from their lineage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MiB = 1 << 20


def main(d: Path) -> int:
    import ray
    from ray._private.internal_api import memory_summary
    from ray.cluster_utils import Cluster

    from fmforge.runtime.local import run_paths
    from fmforge.runtime.progress import RunConsole
    from fmforge.stages import datapile as dp
    from fmforge.stages import raysession

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 80 * MiB,
        "_system_config": {"object_spilling_threshold": 0.01, "min_spilling_size": 0,
                           "max_direct_call_object_size": 0}})
    try:
        nodes = [c.add_node(num_cpus=1, object_store_memory=80 * MiB) for _ in range(2)]
        c.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = c.address
        nodes_left, raylet = [], []

        def lose_a_node(w, dedup=dp.deduplicate):
            # not the node this driver attached to: its raylet serves the driver, which owns every object
            mine = ray.get_runtime_context().get_node_id()
            node = next(n for n in nodes if n.unique_id != mine)
            raylet.extend(info.process for info in node.all_processes["raylet"])
            c.remove_node(node, allow_graceful=False)
            nodes_left.append(len(c.list_all_nodes()))
            dedup(w)

        dp.STEPS = tuple((n, lose_a_node if s is dp.deduplicate else s) for n, s in dp.STEPS)
        report = run_paths([d / "pile.yaml"], console=RunConsole(rich=False))
        spilled = memory_summary(address=c.address, stats_only=True)
        print(json.dumps({"ok": report.ok, "outcomes": [str(o) for o in report.outcomes],
                          "nodes_left": nodes_left,
                          "lost_raylet_exited": [p.poll() is not None for p in raylet], "memory": spilled}))
        return 0
    finally:
        raysession.shutdown()
        c.shutdown()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
