"""The `fmforge` command line.

    fmforge validate PATH...          check manifests with the API models
    fmforge run PATH...               run the pipeline locally (the embedded default)
    fmforge get [KIND [NAME]]         the local status, shaped like the CR status
    fmforge lineage KIND/NAME         where an artifact came from (--cluster: from a cluster's statuses)
    fmforge approve ModelCard/NAME --by WHO   approve the model a ModelCard evaluated
    fmforge serve Deployment/NAME     serve a Deployment's model in the foreground
    fmforge crds [--out DIR]          write the CRDs generated from the models
    fmforge operator                  run the operator (kopf) against the current cluster
    fmforge version

Exit codes: 0 success; 1 invalid manifests, a failed or waiting object, or an object not found;
2 wrong usage; 130 Ctrl-C; 143 SIGTERM. Errors go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    print(f"fmforge: {msg}", file=sys.stderr)


# -- validate ---------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from .api.manifests import load

    result = load(args.paths)
    for e in result.errors:
        print(e, file=sys.stderr)
    if not args.quiet:
        for s in result.skipped:
            print(f"{s}: skipped (not an fmforge.io object)", file=sys.stderr)
        for m in result.manifests:
            print(f"{m.path}:{m.line}: {m.key}: valid")
    if result.errors:
        _err(f"{len(result.errors)} error(s) in {len(result.files)} file(s)")
        return EXIT_FAILED
    if not result.manifests:
        _err("no fmforge objects found")
        return EXIT_FAILED
    return EXIT_OK


# -- run ------------------------------------------------------------------------------------------


def _on_sigterm(signum, frame) -> None:
    # SIGTERM ends a run as Ctrl-C does: the runner records the object as Failed/Interrupted.
    # (Once a stage starts Ray, ray.init installs its own handler, which raises SystemExit; the
    # runner treats both alike.)
    raise SystemExit(128 + signum)


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from .runtime.local import run_paths
    from .runtime.progress import RunConsole

    console = RunConsole(rich=None if args.progress == "auto" else args.progress == "rich")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        report = run_paths(args.paths, state_dir=args.state_dir, console=console, force=args.force,
                           dry_run=args.dry_run, allow_outside_paths=args.allow_outside_paths)
    except SystemExit:
        _err("stopped by SIGTERM")
        return 128 + signal.SIGTERM
    for e in report.errors:
        print(e, file=sys.stderr)
    if report.errors:
        _err("nothing was run")
        return EXIT_FAILED
    if args.dry_run:
        return EXIT_OK
    if report.outcomes:
        # The run at a glance: each object, what happened, how long it took, what it made.
        rows = [(o.key, o.word, f"{o.seconds:.1f}s" if o.seconds else "-", o.message) for o in report.outcomes]
        widths = [max(len(r[i]) for r in rows + [("OBJECT", "RESULT", "TIME", "")]) for i in range(3)]
        print("  ".join(h.ljust(w) for h, w in zip(("OBJECT", "RESULT", "TIME"), widths, strict=True)) + "  DETAIL")
        for r in rows:
            detail = r[3] if len(r[3]) <= 100 else r[3][:99] + "…"
            # The first three columns padded; the detail (the fourth) follows as it is.
            print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + detail)
    counts: dict[str, int] = {}
    for o in report.outcomes:
        counts[o.word] = counts.get(o.word, 0) + 1
    summary = ", ".join(f"{n} {w.lower()}" for w, n in counts.items())
    print(f"fmforge run: {summary}", file=sys.stderr)
    if args.serve:
        from .runtime.local import default_state_dir
        from .runtime.state import StateDir

        state = StateDir(args.state_dir or default_state_dir(args.paths))
        served = [state.read("Deployment", o.key.split("/", 1)[1]) for o in report.outcomes
                  if o.key.startswith("Deployment/") and o.word in ("Succeeded", "Skipped")]
        if served and report.ok:
            return _serve_records(state, served)
    return EXIT_OK if report.ok else EXIT_FAILED


def _state(args: argparse.Namespace):
    """The state directory of `get` and `lineage`: --state-dir, or ./.fmforge."""
    from .runtime.local import default_state_dir
    from .runtime.state import StateDir

    return StateDir(Path(args.state_dir) if args.state_dir else default_state_dir(["."]))


# -- get ------------------------------------------------------------------------------------------


def _jsonpath(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.strip(".").split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _age(ts: str | None) -> str:
    if not ts:
        return "<unknown>"
    then = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    s = int((datetime.now(UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _cell(value: Any, col_type: str) -> str:
    if value is None:
        return "<none>"
    if col_type == "date":
        return _age(value)
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_get(args: argparse.Namespace) -> int:
    from .api.v1alpha1 import KIND_ORDER, KINDS, kind_info
    from .runtime.state import public

    state = _state(args)
    try:
        kinds = [kind_info(args.kind).kind] if args.kind else list(KIND_ORDER)
    except KeyError as e:
        _err(str(e.args[0]))
        return EXIT_USAGE
    records = [state.live_view(r) for k in kinds for r in state.records(k)]
    if args.name:
        records = [r for r in records if r["metadata"]["name"] == args.name]
        if not records:
            _err(f"{kinds[0]}/{args.name} not found in {state.root}")
            return EXIT_FAILED
    if args.output == "json":
        items = [public(r) for r in records]
        print(json.dumps(items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}, indent=2))
        return EXIT_OK
    if args.output == "yaml":
        items = [public(r) for r in records]
        out = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
        print(yaml.safe_dump(out, sort_keys=False), end="")
        return EXIT_OK
    if not records:
        where = state.root if state.exists() else f"{state.root} (no state yet: run `fmforge run` first)"
        print(f"No resources found in {where}.", file=sys.stderr)
        return EXIT_OK
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        info = KINDS[kind]
        cols = [c for c in info.columns if c.priority == 0 or args.wide]
        header = ["NAME"] + [c.name.upper() for c in cols]
        table = [header] + [
            [f"{kind.lower()}.fmforge.io/{r['metadata']['name']}" if len(kinds) > 1 else r["metadata"]["name"]]
            + [_cell(_jsonpath(r, c.json_path), c.type) for c in cols]
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if len(kinds) > 1:
            print()
    return EXIT_OK


# -- lineage --------------------------------------------------------------------------------------


def _describe(rec: dict[str, Any]) -> str:
    """One line of `fmforge lineage`: the phase, generation and what the object made or used."""
    st, fm = rec.get("status") or {}, rec.get("fmforge") or {}
    bits = [st.get("phase") or "Pending", f"generation {rec['metadata'].get('generation')}"]
    if st.get("version"):
        bits.append(f"snapshot {st['version'].get('snapshotId')}")
    if st.get("tags"):
        bits.append("tags " + ",".join(st["tags"]))
    if (st.get("dataPile") or {}).get("snapshotId"):
        bits.append(f"trained on {st['dataPile']['name']} snapshot {st['dataPile']['snapshotId']}")
    if st.get("modelDigest"):
        bits.append(f"evaluated {st['modelDigest'][:19]}" + (" (approved)" if st.get("approved") else ""))
    if (st.get("model") or {}).get("uri"):
        bits.append(f"model {st['model']['uri']}")
    if (st.get("servedModel") or {}).get("digest"):
        served = st["servedModel"]
        bits.append(f"serving {served['digest'][:19]}" + (f" (card {served['modelCard']})"
                                                          if served.get("modelCard") else ""))
    if st.get("url"):
        bits.append(f"at {st['url']}")
    if fm.get("artifactDigest"):
        bits.append(fm["artifactDigest"][:19])
    return ", ".join(bits)


def _sources(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """What the object read, with digests: the local record's lineage, or the status's sources (a
    DataPile's, on a cluster)."""
    return (rec.get("fmforge") or {}).get("lineage") or (rec.get("status") or {}).get("sources") or []


def cmd_lineage(args: argparse.Namespace) -> int:
    from .api.v1alpha1 import KINDS, kind_info

    if "/" not in args.object:
        _err(f"expected KIND/NAME, such as TrainingRun/pydocs-gpt (got {args.object!r})")
        return EXIT_USAGE
    kind, name = args.object.split("/", 1)
    try:
        kind = kind_info(kind).kind
    except KeyError as e:
        _err(str(e.args[0]))
        return EXIT_USAGE
    #: what a read may raise part way (the cluster gone): said, not a traceback
    unreachable: tuple[type[Exception], ...] = ()
    if args.cluster:
        from .kube.lookup import ClusterUnreachable, object_reader

        unreachable = (ClusterUnreachable,)
        try:
            read, namespace = object_reader(args.namespace, args.kubeconfig, args.context)
            first = read(kind, name)
        except ClusterUnreachable as e:
            _err(str(e))
            return EXIT_FAILED
        where = f"namespace {namespace} of the cluster"
    else:
        if args.namespace or args.kubeconfig or args.context:
            _err("--namespace, --kubeconfig and --context read a cluster: add --cluster")
            return EXIT_USAGE
        state = _state(args)
        read, where = state.read, str(state.root)
        first = read(kind, name)
    if first is None:
        _err(f"{kind}/{name} not found in {where}")
        return EXIT_FAILED

    def walk(k: str, n: str, depth: int, seen: set[str]) -> None:
        key = f"{k}/{n}"
        rec = first if depth == 0 else read(k, n)
        pad = "  " * depth + ("└─ " if depth else "")
        if rec is None:
            print(f"{pad}{key}: not in {where}")
            return
        print(f"{pad}{key}: {_describe(rec)}")
        if key in seen:
            return
        seen.add(key)
        spec = KINDS[k].spec.model_validate(rec["spec"])
        for ref in KINDS[k].references(spec):
            walk(ref.kind, ref.name, depth + 1, seen)
        for src in _sources(rec):
            line = f"└─ source {src.get('name')}: {src.get('uri')} {src.get('digest') or ''}"
            print("  " * (depth + 1) + line.rstrip())

    try:
        walk(kind, name, 0, set())
    except unreachable as e:
        _err(str(e))
        return EXIT_FAILED
    return EXIT_OK


# -- approve --------------------------------------------------------------------------------------


def cmd_approve(args: argparse.Namespace) -> int:
    from .runtime.approval import ApprovalError, approve

    kind, _, name = args.object.partition("/")
    if kind.lower() not in ("modelcard", "modelcards", "card", "mc") or not name:
        _err(f"expected ModelCard/NAME, such as ModelCard/pydocs-qa (got {args.object!r})")
        return EXIT_USAGE
    from .runtime.state import StateBusy

    state = _state(args)
    try:
        with state.lock():  # a run writes records too: one writer at a time
            record = approve(state, name, args.by, args.digest)
    except (ApprovalError, StateBusy) as e:
        _err(str(e))
        return EXIT_FAILED
    print(f"ModelCard/{name}: {record['status']['message']}")
    return EXIT_OK


# -- serve ----------------------------------------------------------------------------------------


def _serve_records(state, records: list[dict[str, Any]], host: str = "127.0.0.1") -> int:
    """Serve the models of these Deployment records on `host` (this machine only, unless told)
    until Ctrl-C or SIGTERM; each server refuses model files that are not its record's digest."""
    import signal
    import time

    from .stages.deploy import _url, start_server, stop_server

    procs = []
    try:
        for rec in records:
            name, st = rec["metadata"]["name"], rec.get("status") or {}
            model, port = (st.get("servedModel") or {}), ((rec["spec"].get("kserve") or {}).get("port") or 8080)
            if not model.get("uri"):
                _err(f"Deployment/{name} has served no model yet ({st.get('phase')}: {st.get('message')}); "
                     f"run it first")
                return EXIT_FAILED
            log = state.artifacts_dir("Deployment", name) / "logs" / "server.log"
            procs.append(start_server(name, Path(model["uri"].removeprefix("file://")), port, log, host=host,
                                      digest=model.get("digest")))
            url = _url(host, port)  # where this machine reaches it
            scope = ("every interface" if host in ("0.0.0.0", "::") else
                     "this machine only" if host in ("127.0.0.1", "::1", "localhost") else "that address only")
            print(f"Deployment/{name}: serving model {model.get('digest')} at {url} (listening on {host}, port {port}: "
                  f"{scope})\n"
                  f"  curl -s {url}/openai/v1/completions -H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{name}\", \"prompt\": \"Python is\", \"max_tokens\": 16}}'\n"
                  f"  (classifiers: POST /v1/models/{name}:predict with {{\"instances\": [\"some text\"]}})",
                  flush=True)
        signal.signal(signal.SIGTERM, _on_sigterm)
        print("Press Ctrl-C to stop.", file=sys.stderr, flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        _err("a model server exited; see its log under the state directory's artifacts")
        return EXIT_FAILED
    except (KeyboardInterrupt, SystemExit):
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - StageError and OSError: said to the user, not a traceback
        _err(str(e))
        return EXIT_FAILED
    finally:
        for p in procs:
            stop_server(p)


def cmd_serve(args: argparse.Namespace) -> int:
    state = _state(args)
    kind, _, name = args.object.partition("/")
    if kind.lower() not in ("deployment", "deployments", "deployments.fmforge.io", "fmdeploy") or not name:
        _err(f"expected Deployment/NAME, such as Deployment/pydocs-qa (got {args.object!r})")
        return EXIT_USAGE
    rec = state.read("Deployment", name)
    if rec is None:
        _err(f"Deployment/{name} not found in {state.root}; run it first with `fmforge run`")
        return EXIT_FAILED
    return _serve_records(state, [rec], args.host)


# -- crds, version --------------------------------------------------------------------------------


def cmd_crds(args: argparse.Namespace) -> int:
    from .api.crdgen import render_crds, write_crds

    if args.stdout:
        for text in render_crds().values():
            print(text, end="")
        return EXIT_OK
    for p in write_crds(Path(args.out)):
        print(p)
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from .handlers import Options, run

    # The flag replaces the variable (argparse would append to a default list instead).
    namespaces = args.namespace or [n for n in os.environ.get("FMFORGE_NAMESPACES", "").split(",") if n]
    run(Options(config=args.config, metrics_port=args.metrics_port), namespaces=namespaces,
        health_port=args.health_port, log_format=args.log_format, log_level=args.log_level)
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    from .api.v1alpha1 import API_VERSION

    print(f"fmforge {__version__} (API {API_VERSION})")
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fmforge",
        description="Carry a foundation model from raw data to a served endpoint, on Kubernetes or on one machine.",
        epilog="Exit codes: 0 success; 1 invalid manifests or a failed object; 2 wrong usage.",
    )
    p.add_argument("--version", action="version", version=f"fmforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    v = sub.add_parser("validate", help="check manifests against the fmforge.io/v1alpha1 API",
                       description="Validate fmforge manifests (files or directories) with the same models "
                       "the CRDs are generated from. Each error names the file and line, the object, the "
                       "field and what is allowed.")
    v.add_argument("paths", nargs="+", metavar="PATH", help="manifest file or directory (searched recursively)")
    v.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run the pipeline locally, with no cluster",
                       description="Run the objects of the manifests in the order of their references, "
                       "in-process, recording status and artifacts in the state directory. Objects whose spec "
                       "and inputs are unchanged since their last success are skipped.")
    r.add_argument("paths", nargs="+", metavar="PATH", help="manifest file or directory")
    r.add_argument("--state-dir", type=Path, help="where status and artifacts go (default: .fmforge/ next to "
                   "the manifests)")
    r.add_argument("--force", action="store_true", help="run every object even if unchanged")
    r.add_argument("--dry-run", action="store_true", help="print the order and stop")
    r.add_argument("--serve", action="store_true", help="after the run, keep serving the Deployments' models "
                   "until Ctrl-C")
    r.add_argument("--allow-outside-paths", action="store_true",
                   help="let file:// URIs name paths outside the manifests' folder (off: a manifest from "
                   "elsewhere cannot read this machine's files)")
    r.add_argument("--progress", choices=("auto", "rich", "plain"), default="auto",
                   help="progress bars (rich) or log lines (plain); auto: bars on a terminal")
    r.set_defaults(func=cmd_run)

    g = sub.add_parser("get", help="show the local status of objects",
                       description="Show the status that `fmforge run` recorded, in the shape of the custom "
                       "resources' status; the table has the CRDs' printer columns.")
    g.add_argument("kind", nargs="?", help="DataPile, TrainingRun, ModelCard, TunedModel, Deployment (or a "
                   "plural or short name); default: all")
    g.add_argument("name", nargs="?", help="object name")
    g.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default="table")
    g.add_argument("--state-dir", type=Path, help="state directory (default: ./.fmforge)")
    g.set_defaults(func=cmd_get)

    ln = sub.add_parser("lineage", help="print where an object's artifact came from",
                        description="Print the chain endpoint -> model -> training run -> pile version -> "
                        "sources, with digests, from the local state, or with --cluster from the objects' "
                        "statuses on a cluster (kubectl's configuration).")
    ln.add_argument("object", metavar="KIND/NAME")
    ln.add_argument("--state-dir", type=Path, help="state directory (default: ./.fmforge)")
    ln.add_argument("--cluster", action="store_true",
                    help="read the objects from the cluster of KUBECONFIG (or --kubeconfig) instead")
    ln.add_argument("-n", "--namespace", help="with --cluster: the namespace (default: the context's, else default)")
    ln.add_argument("--kubeconfig", help="with --cluster: the kubeconfig file (default: KUBECONFIG, ~/.kube/config)")
    ln.add_argument("--context", help="with --cluster: the kubeconfig context (default: the current one)")
    ln.set_defaults(func=cmd_lineage)

    sv = sub.add_parser("serve", help="serve a Deployment's model in the foreground",
                        description="Start the model server of a Deployment that `fmforge run` verified, on its "
                        "port, until Ctrl-C.")
    sv.add_argument("object", metavar="Deployment/NAME")
    sv.add_argument("--state-dir", type=Path, help="state directory (default: ./.fmforge)")
    sv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine "
                    "only; 0.0.0.0: every interface, reachable from the network)")
    sv.set_defaults(func=cmd_serve)

    a = sub.add_parser("approve", help="approve the model a ModelCard evaluated (approval: manual)",
                       description="Record a person's approval of exactly the model a ModelCard evaluated "
                       "(its digest), as the annotations fmforge.io/approved-by and fmforge.io/approved-digest do "
                       "on a cluster. A new model needs a new approval.")
    a.add_argument("object", metavar="ModelCard/NAME")
    a.add_argument("--by", required=True, metavar="WHO", help="who approves (a name or an e-mail address)")
    a.add_argument("--digest", metavar="SHA256", help="the model digest you reviewed (status.modelDigest, in the "
                   "card); refused when the card has evaluated another model since")
    a.add_argument("--state-dir", type=Path, help="state directory (default: ./.fmforge)")
    a.set_defaults(func=cmd_approve)

    c = sub.add_parser("crds", help="write the CRDs generated from the API models")
    c.add_argument("--out", default="crds", help="directory (default: %(default)s)")
    c.add_argument("--stdout", action="store_true", help="print them instead")
    c.set_defaults(func=cmd_crds)

    env = os.environ.get
    op = sub.add_parser("operator", help="run the operator against the current cluster",
                        description="Run the fmforge operator (kopf): watch the five kinds and reconcile them "
                        "into KubeRay RayJobs and KServe InferenceServices. Credentials: the pod's ServiceAccount, "
                        "else $KUBECONFIG or ~/.kube/config. Each flag defaults to the environment variable named.")
    op.add_argument("--config", default=env("FMFORGE_CONFIG"),
                    help="settings file (charts/fmforge's config.yaml) [FMFORGE_CONFIG]; default: built-in defaults")
    op.add_argument("--namespace", action="append",
                    help="watch this namespace (repeat for more) [FMFORGE_NAMESPACES, comma-separated]; "
                    "default: the config's watchNamespaces, else all")
    op.add_argument("--metrics-port", type=int, default=int(env("FMFORGE_METRICS_PORT", "9090")),
                    help="port of Prometheus /metrics, 0 for none [FMFORGE_METRICS_PORT] (default: %(default)s)")
    op.add_argument("--health-port", type=int, default=int(env("FMFORGE_HEALTH_PORT", "8080")),
                    help="port of the /healthz probe, 0 for none [FMFORGE_HEALTH_PORT] (default: %(default)s)")
    op.add_argument("--log-format", choices=("plain", "full", "json"), default=env("FMFORGE_LOG_FORMAT", "full"),
                    help="log lines [FMFORGE_LOG_FORMAT] (default: %(default)s)")
    op.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                    default=env("FMFORGE_LOG_LEVEL", "info"), help="[FMFORGE_LOG_LEVEL] (default: %(default)s)")
    op.set_defaults(func=cmd_operator)

    ver = sub.add_parser("version", help="print the version")
    ver.set_defaults(func=cmd_version)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output", None) == "wide":
        args.output, args.wide = "table", True
    else:
        args.wide = False
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_OK


def entry() -> None:
    """The `fmforge` console script: main(), then a quick exit.

    Once the command is over and its records are written, Ray (if a stage started it) is shut
    down explicitly, its temporary files removed, and the process leaves with os._exit: Python's
    own teardown after a run (Ray's C++ core worker, Arrow memory pools, a few thousand modules)
    takes about 0.7 s and does
    nothing a finished command needs. mypy exits the same way. Tests call main() and are not
    affected."""
    import logging
    import os

    rc = main()
    from .stages import raysession

    raysession.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
