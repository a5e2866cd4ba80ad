"""Print the requirements of the fmforge package and the extras named, one per line, read from
operator/pyproject.toml: the Containerfiles install these in a layer of their own, before the
code is copied, so that a change of the code rebuilds only the last, small layer.

    python images/requirements.py operator/pyproject.toml [EXTRA...]

An extra that names fmforge itself (`stages = ["fmforge[data,train,serve]"]`) is expanded.
"""

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str], seen: set[str] | None = None) -> list[str]:
    seen = set() if seen is None else seen
    out = [] if seen else list(project.get("dependencies", []))
    for extra in extras:
        if extra in seen:
            continue
        seen.add(extra)
        for req in project.get("optional-dependencies", {}).get(extra, []):
            m = re.fullmatch(r"\s*" + re.escape(project["name"]) + r"\s*\[([^\]]*)\]\s*", req)
            if m:
                out += requirements(project, [e.strip() for e in m.group(1).split(",")], seen)
            else:
                out.append(req)
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(dict.fromkeys(requirements(project, sys.argv[2:]))))
