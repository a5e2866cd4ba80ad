"""The local runner behind `fmforge run`: the embedded default, with no cluster.

It loads the manifests, orders them by their references (a graph: a cycle or a dangling
reference is an error that names the objects), and runs each object's stage in-process, writing
status and artifacts into the state directory. An object whose spec and inputs are unchanged
since its last success, and whose outputs are as it made them, is skipped; inputs are the
producers' artifact digests and the fingerprint of every URI the spec names
(`fmforge.runtime.fingerprint`). An object whose producer is not ready waits. A failed attempt
keeps the status fields (version, model, url) of the last success, so nothing already made is
lost. A ModelCard's verdict (rejected, waiting for approval) comes from the stage's result.

A run holds the state directory's lock from start to end (a second run on it fails at once,
naming the holder), records itself as the owner of what it runs, and first takes over what a
killed run left: records still `Running` become Failed (RunnerDied) and the dead run's Ray
processes and files are removed. Ctrl-C and SIGTERM end the object being run as
Failed/Interrupted.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..api.manifests import Manifest, load
from ..api.status import DONE, Phase, now, with_phase
from ..api.v1alpha1 import API_VERSION
from ..api.v1alpha1.modelcard import REJECTED, WAITING_FOR_APPROVAL
from ..stages import raysession, stage_for
from ..stages.base import StageContext, StageError, StageResult, TemporaryError
from .approval import approval_annotations
from .fingerprint import DigestCache, fingerprint, output_uris, spec_uris
from .progress import RunConsole
from .state import StateBusy, StateDir

#: The pip extra that brings each stage's dependencies.
EXTRAS = {"DataPile": "data", "TrainingRun": "train", "ModelCard": "train", "TunedModel": "train",
          "Deployment": "serve"}


class GraphError(Exception):
    """The manifests do not form a runnable graph; `errors` says why, one line each."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass
class Outcome:
    """What happened to one object in a run."""

    key: str
    word: str
    """Succeeded, Skipped, Failed, Waiting."""
    message: str = ""
    seconds: float = 0.0


@dataclass
class RunReport:
    """The result of `run`."""

    order: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(o.word in (Phase.SUCCEEDED, "Skipped") for o in self.outcomes)


def default_state_dir(paths: list[str | Path]) -> Path:
    """`.fmforge/` next to the manifests: in the first directory given, or beside the first file."""
    first = Path(paths[0])
    return (first if first.is_dir() else first.parent) / ".fmforge"


def _waiting_for_approval(record: dict[str, Any]) -> bool:
    ready = next((c for c in record["status"].get("conditions") or [] if c.get("type") == "Ready"), {})
    return record["status"].get("phase") == Phase.WAITING and ready.get("reason") == WAITING_FOR_APPROVAL


def _succeeded(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("status", {}).get("phase") in DONE


def _evaluated_model(card: dict[str, Any]) -> str:
    """`KIND/NAME` of the model a ModelCard record evaluates (its modelRef kind defaults to TrainingRun)."""
    ref = card["spec"]["modelRef"]
    return f"{ref.get('kind', 'TrainingRun')}/{ref['name']}"


def _generation(old: dict[str, Any] | None, sdigest: str) -> int:
    """The generation of a run: the last run's, plus one when the spec changed since."""
    if not old:
        return 1
    generation = old["metadata"].get("generation", 1)
    if (old.get("fmforge") or {}).get("manifestDigest", (old.get("fmforge") or {}).get("specDigest")) != sdigest:
        generation += 1
    return generation


def build_graph(manifests: list[Manifest], state: StateDir) -> tuple[list[Manifest], dict[str, set[str]]]:
    """Order the manifests by their references; return the order and each object's producers.

    A reference may name an object in the manifests or one the state directory already holds
    from an earlier run. A Deployment that requires an approved ModelCard also depends on the
    ModelCards of its model, so it runs after them.
    """
    by_key = {m.key: m for m in manifests}
    deps: dict[str, set[str]] = {m.key: set() for m in manifests}
    errors: list[str] = []
    namespaces = {m.namespace for m in manifests}
    if len(namespaces) > 1:
        errors.append(f"the local runner runs one namespace at a time; the manifests use {sorted(namespaces)}")
    for m in manifests:
        for ref in m.info.references(m.spec):
            target = f"{ref.kind}/{ref.name}"
            if target in by_key:
                deps[m.key].add(target)
            elif state.read(ref.kind, ref.name) is None:
                errors.append(
                    f"{m.key}: {ref.field}: refers to {target}, which is neither in the manifests nor in "
                    f"the state directory {state.root}; add its manifest or fix the name"
                )
        if m.kind == "Deployment" and m.spec.require_approved_model_card:
            model = f"{m.spec.model_ref.kind}/{m.spec.model_ref.name}"
            cards = [c.key for c in manifests if c.kind == "ModelCard"
                     and f"{c.spec.model_ref.kind}/{c.spec.model_ref.name}" == model]
            in_state = [r for r in state.records("ModelCard") if _evaluated_model(r) == model]
            if cards:
                deps[m.key].update(cards)
            elif not in_state:
                errors.append(
                    f"{m.key}: spec.requireApprovedModelCard: needs an approved ModelCard for {model}, and no "
                    f"ModelCard in the manifests or the state directory evaluates it; add one, or set "
                    f"requireApprovedModelCard: false"
                )
    if errors:
        raise GraphError(errors)
    sorter = graphlib.TopologicalSorter(deps)
    try:
        flat = list(sorter.static_order())
    except graphlib.CycleError as e:
        cycle = " -> ".join(reversed(e.args[1]))
        raise GraphError([f"the references form a cycle: {cycle}; an object cannot depend on itself"]) from None
    return [by_key[k] for k in flat], deps


def manifest_digest(m: Manifest) -> str:
    """Digest of what the manifest asks for (kind, name, spec): a change is a new generation."""
    body = {"kind": m.kind, "name": m.name, "spec": m.spec.model_dump(mode="json", by_alias=True)}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def input_digest(m: Manifest, upstream: dict[str, dict[str, Any]], fingerprint: str = "") -> str:
    """Digest of what an attempt depends on: the manifest, the producers' artifacts, and the
    fingerprint of the URIs its spec names (files, objects)."""
    parts = {
        "spec": manifest_digest(m),
        "upstream": {k: (r.get("fmforge") or {}).get("artifactDigest") for k, r in sorted(upstream.items())},
        "fingerprint": fingerprint,
    }
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class LocalRunner:
    """Runs a set of manifests in-process against a state directory."""

    def __init__(self, state_dir: Path, console: RunConsole | None = None, force: bool = False,
                 allow_outside_paths: bool = False):
        # Absolute: what the stages record (artifact URIs, the tokenizer) must resolve from any folder.
        self.state = StateDir(Path(state_dir).resolve())
        self.digests = DigestCache(self.state.root / "cache" / "fingerprints.json")
        self.console = console or RunConsole()
        self.force = force
        self.allow_outside_paths = allow_outside_paths
        self.owner: dict[str, Any] = {}

    def run(self, manifests: list[Manifest], dry_run: bool = False) -> RunReport:
        report = RunReport()
        order, deps = build_graph(manifests, self.state)
        report.order = [m.key for m in order]
        if dry_run:
            for m in order:
                after = ", ".join(sorted(deps[m.key])) or "nothing"
                self.console.status(m.key, "Planned", f"after {after}")
            return report
        with self.state.lock() as self.owner:
            self._take_over()
            try:
                for m in order:
                    report.outcomes.append(self._run_one(m, deps[m.key]))
            finally:
                self.digests.save()
        return report

    def _take_over(self) -> None:
        """Clean up after a run that died on this state directory (we hold its lock now)."""
        stopped = raysession.reap(self.state.root)
        if stopped:
            self.console.status("state", "Cleaned", f"stopped {stopped} Ray processes a killed run left behind")
        for rec in list(self.state.records()):
            view = self.state.live_view(rec)
            if view is not rec:
                self.state.write(view)
                self.console.status(f"{rec['kind']}/{rec['metadata']['name']}", Phase.FAILED,
                                    f"RunnerDied: {view['status']['message']}")

    # -- one object ---------------------------------------------------------------------------
    def _run_one(self, m: Manifest, dep_keys: set[str]) -> Outcome:
        """Run one object: wait for its producers, skip it when nothing changed, else run its stage."""
        started = time.monotonic()
        old = self.state.read(m.kind, m.name)
        upstream = self._upstream(m, dep_keys)
        sdigest = manifest_digest(m)
        generation = _generation(old, sdigest)
        record = self._base_record(m, old, generation, sdigest)
        waiting = self._wait_for_upstream(m, record, upstream)
        if waiting:
            return waiting
        try:
            stage = stage_for(m.kind)
        except ImportError as e:
            return self._missing_dependencies(m, record, e)
        uris = list(spec_uris(m.spec.model_dump(mode="json", by_alias=True, exclude_none=True)))
        digest = input_digest(m, upstream, fingerprint(uris, m.path.parent.resolve(), self.digests))
        unchanged = self._unchanged(m, record, digest)
        if unchanged:
            return unchanged
        return self._run_stage(m, stage, record, generation, upstream, digest, started)

    def _upstream(self, m: Manifest, dep_keys: set[str]) -> dict[str, dict[str, Any] | None]:
        """The records `m` reads: its producers in this run, those of earlier runs, and its ModelCards."""
        upstream = {k: self.state.read(*k.split("/", 1)) for k in sorted(dep_keys)}
        for ref in m.info.references(m.spec):  # references satisfied from earlier runs' state
            key = f"{ref.kind}/{ref.name}"
            upstream.setdefault(key, self.state.read(ref.kind, ref.name))
        if m.kind == "Deployment" and m.spec.require_approved_model_card:
            # The governance gate reads the ModelCards of the model, also those of earlier runs.
            model = f"{m.spec.model_ref.kind}/{m.spec.model_ref.name}"
            for rec in self.state.records("ModelCard"):
                if _evaluated_model(rec) == model:
                    upstream.setdefault(f"ModelCard/{rec['metadata']['name']}", rec)
        return upstream

    def _wait_for_upstream(self, m: Manifest, record: dict[str, Any],
                           upstream: dict[str, dict[str, Any] | None]) -> Outcome | None:
        """A Waiting outcome while a producer has not succeeded; None when all have."""
        blocked = {k: r for k, r in upstream.items() if not _succeeded(r)}
        if not blocked:
            return None
        why = "; ".join(
            f"{k} is {(r or {}).get('status', {}).get('phase', 'not run')}" for k, r in blocked.items()
        )
        msg = f"waiting for {', '.join(blocked)} to be ready ({why})"
        reason = "WaitingForUpstream"
        if all(r and _waiting_for_approval(r) for r in blocked.values()):
            # Only a person can move it on: say what to run, not just that a card waits.
            reason = WAITING_FOR_APPROVAL
            msg = "; ".join(f"{k}: {r['status'].get('message', '')}" for k, r in blocked.items())
        self._write(record, Phase.WAITING, reason, msg)
        self.console.status(m.key, Phase.WAITING, msg)
        return Outcome(m.key, Phase.WAITING, msg)

    def _missing_dependencies(self, m: Manifest, record: dict[str, Any], e: ImportError) -> Outcome:
        """Failed, naming the extra to install: the stage's packages could not be imported."""
        extra = EXTRAS.get(m.kind, "stages")
        msg = (f"the {m.kind} stage needs packages that are not installed ({e.name or e}); "
               f"install them with: pip install 'fmforge[{extra}]'")
        self._write(record, Phase.FAILED, "MissingDependencies", msg)
        self.console.status(m.key, Phase.FAILED, msg)
        return Outcome(m.key, Phase.FAILED, msg)

    def _unchanged(self, m: Manifest, record: dict[str, Any], digest: str) -> Outcome | None:
        """Skipped (or still waiting for approval) when spec and inputs are those of the last run."""
        prior = record.get("fmforge") or {}
        if self.force or prior.get("digest") != digest:
            return None
        if prior.get("outputs") and self._outputs(record["status"]) != prior["outputs"]:
            # What it made was changed afterwards (a flipped byte in the weights): make it again
            # rather than hand changed bytes on under the recorded digest.
            self.console.status(m.key, "Changed", "its outputs changed since it made them; running it again")
            return None
        if record["status"].get("phase") in DONE:
            msg = f"spec and inputs unchanged since {prior.get('finishedAt', 'the last run')}"
            self.console.status(m.key, "Skipped", msg)
            return Outcome(m.key, "Skipped", msg)
        if _waiting_for_approval(record):
            # Evaluated already; only a person can move it on (`fmforge approve`).
            msg = record["status"].get("message", "")
            self.console.status(m.key, Phase.WAITING, msg)
            return Outcome(m.key, Phase.WAITING, msg)
        return None

    def _outputs(self, status: dict[str, Any]) -> str:
        return fingerprint(list(output_uris(status)), self.state.root, self.digests)

    def _run_stage(self, m: Manifest, stage: Callable[[StageContext], StageResult], record: dict[str, Any],
                   generation: int, upstream: dict[str, dict[str, Any] | None], digest: str, started: float) -> Outcome:
        """Run the stage in-process and record how it ended; an error ends this object, never the runner."""
        record["fmforge"]["owner"] = self.owner
        self._write(record, Phase.RUNNING, "Started", f"running the {m.info.stage} stage (generation {generation})")
        self.console.status(m.key, Phase.RUNNING, f"generation {generation}")
        artifacts = self.state.artifacts_dir(m.kind, m.name)
        artifacts.mkdir(parents=True, exist_ok=True)
        reporter = self.console.reporter(m.key)
        ctx = StageContext(
            kind=m.kind, name=m.name, namespace=m.namespace, generation=generation, spec=m.spec,
            inputs={k: v for k, v in upstream.items() if v is not None}, base_dir=m.path.parent.resolve(),
            artifacts=artifacts, state_dir=self.state.root, reporter=reporter,
            allow_outside_paths=self.allow_outside_paths,
            annotations={**(m.metadata.get("annotations") or {}), **approval_annotations(record)},
        )
        try:
            result = stage(ctx)
        except TemporaryError as e:
            reporter.close()
            self._write(record, Phase.WAITING, e.reason, str(e))
            self.console.status(m.key, Phase.WAITING, str(e))
            return Outcome(m.key, Phase.WAITING, str(e), time.monotonic() - started)
        except StageError as e:
            reporter.close()
            return self._fail(m, record, e.reason, str(e), started)
        except (KeyboardInterrupt, SystemExit) as e:
            # SystemExit: SIGTERM, through fmforge's handler or the one ray.init installs.
            reporter.close()
            why = "stopped by SIGTERM" if isinstance(e, SystemExit) else "interrupted by the user (Ctrl-C)"
            self._fail(m, record, "Interrupted", why, started)
            raise
        except Exception as e:  # noqa: BLE001 - any other error ends this object, never the runner
            reporter.close()
            log = self._write_traceback(m)
            return self._fail(m, record, "StageFailed", f"{type(e).__name__}: {e} (traceback in {log})", started)
        reporter.close()
        return self._finish(m, record, result, upstream, digest, started)

    def _finish(self, m: Manifest, record: dict[str, Any], result: StageResult,
                upstream: dict[str, dict[str, Any] | None], digest: str, started: float) -> Outcome:
        """Record a stage's result: its status, digests and lineage, then how it ended."""
        record["status"] = {**record["status"], **result.status}
        record["fmforge"] = {
            **record.get("fmforge", {}),
            "digest": digest,
            "artifactDigest": result.digest,
            "finishedAt": now(),
            "inputs": {k: (v.get("fmforge") or {}).get("artifactDigest") for k, v in upstream.items() if v},
            "lineage": result.lineage,
            "outputs": self._outputs(result.status),
        }
        if result.waiting:
            self._write(record, Phase.WAITING, WAITING_FOR_APPROVAL, result.waiting)
            self.console.status(m.key, Phase.WAITING, result.waiting)
            return Outcome(m.key, Phase.WAITING, result.waiting, time.monotonic() - started)
        if result.rejected:
            return self._fail(m, record, REJECTED, result.rejected, started)
        # A local Deployment is verified and stopped, not serving: Succeeded, not Ready-as-serving.
        self._write(record, Phase.SUCCEEDED, "Succeeded", result.message or f"{m.info.stage} stage succeeded")
        took = time.monotonic() - started
        self.console.status(m.key, Phase.SUCCEEDED, f"{result.message} ({took:.1f}s)".strip())
        return Outcome(m.key, Phase.SUCCEEDED, result.message, took)

    def _fail(self, m: Manifest, record: dict[str, Any], reason: str, message: str, started: float) -> Outcome:
        # The status fields of the last success (version, model, url) stay: nothing made is lost.
        self._write(record, Phase.FAILED, reason, message)
        self.console.status(m.key, Phase.FAILED, f"{reason}: {message}")
        return Outcome(m.key, Phase.FAILED, f"{reason}: {message}", time.monotonic() - started)

    def _base_record(self, m: Manifest, old: dict[str, Any] | None, generation: int, sdigest: str) -> dict[str, Any]:
        meta = {
            "name": m.name,
            "namespace": m.namespace,
            "generation": generation,
            "creationTimestamp": (old or {}).get("metadata", {}).get("creationTimestamp") or now(),
        }
        for k in ("labels", "annotations"):
            if m.metadata.get(k):
                meta[k] = m.metadata[k]
        return {
            "apiVersion": API_VERSION,
            "kind": m.kind,
            "metadata": meta,
            "spec": m.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            "status": dict((old or {}).get("status") or {}),
            "fmforge": {**((old or {}).get("fmforge") or {}), "manifestDigest": sdigest,
                        "manifest": f"{m.path}:{m.line}"},
        }

    def _write(self, record: dict[str, Any], phase: str, reason: str, message: str) -> None:
        record["status"] = with_phase(record["status"], phase, reason, message, record["metadata"]["generation"])
        self.state.write(record)

    def _write_traceback(self, m: Manifest) -> Path:
        d = self.state.logs_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{m.kind}-{m.name}.log"
        path.write_text(traceback.format_exc())
        return path


def run_paths(
    paths: list[str | Path],
    state_dir: Path | None = None,
    console: RunConsole | None = None,
    force: bool = False,
    dry_run: bool = False,
    allow_outside_paths: bool = False,
) -> RunReport:
    """Load, validate and run the manifests under `paths` (what `fmforge run` does)."""
    loaded = load(paths)
    report = RunReport()
    if loaded.errors:
        report.errors = [str(e) for e in loaded.errors]
        return report
    if not loaded.manifests:
        report.errors = [f"no fmforge objects found in {', '.join(map(str, paths))}"]
        return report
    runner = LocalRunner(state_dir or default_state_dir(paths), console, force, allow_outside_paths)
    try:
        return runner.run(loaded.manifests, dry_run=dry_run)
    except GraphError as e:
        report.errors = e.errors
        return report
    except StateBusy as e:
        report.errors = [str(e)]
        return report


__all__ = ["LocalRunner", "RunReport", "Outcome", "GraphError", "build_graph", "run_paths", "default_state_dir"]
