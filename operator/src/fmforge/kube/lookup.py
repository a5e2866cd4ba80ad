"""Reading fmforge's objects from a cluster for the command line (`fmforge lineage --cluster`).

A person's kubectl configuration (KUBECONFIG, `--kubeconfig`, `--context`), or the pod's
ServiceAccount when run in one with none of those, and the `kubernetes` client: synchronous reads, nothing written.
The operator never uses this; it has its own asyncio client (kube/client.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..api.v1alpha1 import GROUP, VERSION, kind_info

#: the namespace of the pod's ServiceAccount, where the command runs in a pod
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class ClusterUnreachable(Exception):
    """No configuration to log in with, or the API server did not answer: the message says which."""


def object_reader(namespace: str | None = None, kubeconfig: str | None = None,
                  context: str | None = None) -> tuple[Callable[[str, str], dict[str, Any] | None], str]:
    """A function reading KIND/NAME from the cluster (None where there is no such object), and the
    namespace it reads in: `namespace`, else the context's, else `default`."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig and not os.path.isfile(kubeconfig):
        raise ClusterUnreachable(f"no cluster to read from: the kubeconfig {kubeconfig} does not exist. Pass the "
                                 f"file kubectl uses (--kubeconfig, or KUBECONFIG)")
    try:
        config.load_kube_config(config_file=kubeconfig, context=context)
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
        if context:
            current = next((c for c in contexts if c["name"] == context), current)
        namespace = namespace or (current or {}).get("context", {}).get("namespace") or "default"
    except (ConfigException, FileNotFoundError) as e:
        # A pod's own ServiceAccount only where the person named no configuration: a wrong
        # --kubeconfig or --context must not quietly read another cluster.
        if kubeconfig or context or not os.path.exists(SA_NAMESPACE):
            where = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
            raise ClusterUnreachable(f"no cluster to read from with {where}"
                                     f"{f' (context {context})' if context else ''}: {str(e).rstrip('.')}. "
                                     f"Set KUBECONFIG or pass --kubeconfig (and --context), as for kubectl") from e
        try:
            config.load_incluster_config()
        except ConfigException as e2:
            raise ClusterUnreachable(f"no cluster to read from: no kubeconfig ({str(e).rstrip('.')}) and the pod's "
                                     f"ServiceAccount did not do ({e2})") from e2
        with open(SA_NAMESPACE) as f:
            namespace = namespace or f.read().strip() or "default"
    api = client.CustomObjectsApi()

    def read(kind: str, name: str) -> dict[str, Any] | None:
        info = kind_info(kind)
        try:
            return api.get_namespaced_custom_object(GROUP, VERSION, namespace, info.plural, name,
                                                    _request_timeout=(5, 30))
        except ApiException as e:
            if e.status == 404:
                return None
            raise ClusterUnreachable(f"reading {info.kind}/{name} in namespace {namespace}: {e.status} "
                                     f"{e.reason}") from e
        except Exception as e:  # noqa: BLE001 - urllib3's connection errors: the server is not there
            raise ClusterUnreachable(f"reading {info.kind}/{name} in namespace {namespace}: the API server at "
                                     f"{api.api_client.configuration.host} did not answer ({type(e).__name__}: "
                                     f"{e})") from e

    return read, namespace
