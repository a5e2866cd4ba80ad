"""The entrypoint of a RayJob: run one stage from a plan file.

    python -m fmforge.runtime.job --plan /etc/fmforge/plan.json [--result /tmp/result.json]

The plan is the resolved spec the operator writes (`fmforge.kube.builders.plan`): kind, name,
namespace, generation, the spec, the object's annotations, the upstream statuses, where artifacts
and the state (catalogs) live, whether `file://` URIs may leave the base directory
(`allowOutsidePaths`, default false), the ConfigMaps of the spec mounted into the pods
(`configMaps`, name → directory), and (`status`) the object's status subresource. It runs the very
same stage function as the local runner, inside the Ray cluster KubeRay started (RAY_ADDRESS is set
there), and writes the stage's result as JSON, verdict included (`Succeeded`, `Rejected`,
`WaitingForApproval`). In a pod, progress, the result's status fields and the stage's outcome
(`status.outcome`: generation, verdict, reason, message) also go into the object's status
(`fmforge.runtime.report`), where the operator reads the verdict and `kubectl get` shows it. Exit
codes: 0 the stage ran to a verdict (a rejected model is a verdict, not a failure of the job); 2
the stage refused the input (StageError: no retry helps); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from ..api.v1alpha1 import kind_info
from ..api.v1alpha1.modelcard import REJECTED, WAITING_FOR_APPROVAL
from ..kube.stagestatus import StatusWriter
from ..stages import stage_for
from ..stages.base import StageContext, StageError, StageResult
from .progress import ConsoleReporter
from .report import StatusReporter


def load_plan(path: Path) -> dict[str, Any]:
    plan = json.loads(path.read_text())
    missing = [k for k in ("kind", "name", "spec", "artifacts", "stateDir") if k not in plan]
    if missing:
        raise ValueError(f"plan {path} lacks {', '.join(missing)}")
    return plan


def _records(inputs: dict[str, Any]) -> dict[str, Any]:
    """The plan's inputs as the stages read them, records with a `status` (what the local runner
    hands them). The operator's plan holds each producer's status itself (`kube.builders.plan`);
    a status never has a `status` field, so an input that has one is a record already."""
    return {k: v if "status" in v else {"status": v} for k, v in inputs.items()}


def verdict(result: StageResult) -> str:
    """The verdict a stage's result carries: Rejected, WaitingForApproval or Succeeded."""
    if result.rejected:
        return REJECTED
    if result.waiting:
        return WAITING_FOR_APPROVAL
    return "Succeeded"


def run_plan(plan: dict[str, Any], reporter: ConsoleReporter | None = None) -> dict[str, Any]:
    """Run the plan's stage; the result document (status, digest, message, lineage, verdict)."""
    info = kind_info(plan["kind"])
    stage = stage_for(info.kind)
    spec = info.spec.model_validate(plan["spec"])
    artifacts = Path(plan["artifacts"])
    artifacts.mkdir(parents=True, exist_ok=True)
    key = f"{info.kind}/{plan['name']}"
    ctx = StageContext(
        kind=info.kind, name=plan["name"], namespace=plan.get("namespace", "default"),
        generation=int(plan.get("generation", 1)), spec=spec, inputs=_records(plan.get("inputs", {})),
        base_dir=Path(plan.get("baseDir", ".")).resolve(), artifacts=artifacts, state_dir=Path(plan["stateDir"]),
        reporter=reporter or ConsoleReporter(key, rich=False),
        allow_outside_paths=bool(plan.get("allowOutsidePaths", False)),
        config_maps={name: Path(d) for name, d in (plan.get("configMaps") or {}).items()},
        annotations=dict(plan.get("annotations") or {}),
    )
    result = stage(ctx)
    said = result.rejected or result.waiting or result.message
    return {"status": result.status, "digest": result.digest, "message": said, "lineage": result.lineage,
            "verdict": verdict(result)}


def _tell(writer: StatusWriter | None, **fields: Any) -> None:
    """Apply `fields` to the object's status; a failure is logged (the result JSON still says it)."""
    if writer is None:
        return
    try:
        writer.apply(**fields)
    except Exception as e:  # noqa: BLE001 - the exit code and the job's log still carry the outcome
        print(f"fmforge: could not write the outcome into the object's status: {e}", file=sys.stderr)


def execute(plan: dict[str, Any], writer: StatusWriter | None) -> tuple[dict[str, Any], int]:
    """Run the plan's stage and tell the object's status how it ended (through `writer`, when the
    stage runs in a pod); the result document and the exit code."""
    generation = int(plan.get("generation", 1))
    try:
        key = f"{plan['kind']}/{plan['name']}"
        out = {"ok": True, **run_plan(plan, StatusReporter(key, writer) if writer else None)}
        if writer:
            # The result's fields and the verdict in one apply: the operator never sees one without the other.
            writer.apply(**out["status"], outcome={"generation": generation, "verdict": out["verdict"],
                                                   "message": out["message"]})
        return out, 0
    except StageError as e:
        out, code = {"ok": False, "reason": e.reason, "message": str(e)}, 2
    except Exception as e:  # noqa: BLE001 - any other error ends the attempt; KubeRay retries it within backoffLimit
        traceback.print_exc()
        out, code = {"ok": False, "reason": "StageFailed", "message": f"{type(e).__name__}: {e}"}, 1
    # The stage's own words, for the operator to show instead of a bare "job failed".
    _tell(writer, outcome={"generation": generation, "verdict": "Failed", "reason": out["reason"],
                           "message": out["message"][:4000]})
    return out, code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmforge.runtime.job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=Path, required=True, help="the plan JSON file")
    ap.add_argument("--result", type=Path, help="where to write the result JSON (default: stdout)")
    args = ap.parse_args(argv)
    try:
        plan = load_plan(args.plan)
    except (OSError, ValueError) as e:
        out, code = {"ok": False, "reason": "InvalidPlan", "message": f"{type(e).__name__}: {e}"}, 2
    else:
        writer = StatusWriter.in_pod(plan["status"]) if plan.get("status") else None
        out, code = execute(plan, writer)
    text = json.dumps(out, indent=2)
    if args.result:
        args.result.write_text(text + "\n")
    else:
        print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
