"""The DataPile on a Ray cluster of three nodes simulated on this machine, object spilling forced
by small stores and one node lost half-way (tests/stages/cluster_run.py), makes the same version as
`fmforge run` on one local Ray: the same digest, counters, documents and sequences. Both runs are
processes of their own (cluster_run.py says why). About a minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from piles import MINI

from fmforge.runtime.state import StateDir
from fmforge.stages.datapile import publish as pub

HERE = Path(__file__).resolve().parent


def _version(d: Path) -> tuple[dict, tuple]:
    cat = pub.catalog(d / ".fmforge")
    docs = pub.read_version(cat, "default", "mini", "v1").sort_by("id").select(["id", "text", "split"])
    seqs = pub.read_version(cat, "default", "mini", "v1", which="sequences").sort_by("seq")
    return StateDir(d / ".fmforge").read("DataPile", "mini")["status"], (docs, seqs)


def test_three_nodes_spilling_and_losing_one_make_the_version_one_node_makes(corpus: Path, tmp_path: Path):
    m = json.loads(json.dumps(MINI))
    m["spec"]["dedup"]["fuzzy"] = {"enabled": True, "verify": True, "threshold": 0.7}
    for name in ("one", "three"):
        for part in ("prose", "code"):
            shutil.copytree(corpus / part, tmp_path / name / "corpus" / part)
        (tmp_path / name / "pile.yaml").write_text(yaml.safe_dump(m, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    fmforge = Path(sys.executable).parent / "fmforge"
    one = subprocess.run([str(fmforge), "run", str(tmp_path / "one"), "--progress", "plain"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    three = subprocess.run([sys.executable, str(HERE / "cluster_run.py"), str(tmp_path / "three")], env=env,
                           capture_output=True, text=True, timeout=600)
    assert three.returncode == 0, three.stdout[-3000:] + three.stderr[-3000:]
    got = json.loads(three.stdout.strip().splitlines()[-1])
    assert got["ok"], got["outcomes"]
    assert got["nodes_left"] == [2] and got["lost_raylet_exited"] == [True], "a node was lost during the run"
    spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects", got["memory"])
    assert spilled and int(spilled.group(2)) > 0, got["memory"]

    (st1, (docs1, seqs1)), (st3, (docs3, seqs3)) = _version(tmp_path / "one"), _version(tmp_path / "three")
    assert st3["version"]["digest"] == st1["version"]["digest"]
    assert st3["stats"] | {"stepSeconds": 0} == st1["stats"] | {"stepSeconds": 0}
    assert docs3.equals(docs1) and seqs3.equals(seqs1)
    assert st1["stats"]["dropped"]["duplicateExact"] > 0 and seqs1.num_rows > 100
