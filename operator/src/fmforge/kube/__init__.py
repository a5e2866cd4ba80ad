"""The Kubernetes side of fmforge: the only package that talks to the API server.

- `client`: the asyncio client the reconcilers send every request through (kopf's credentials,
  aiohttp, counted requests).
- `settings`: the operator's settings (the chart's config file).
- `names`: deterministic names, labels and owner references of child objects.
- `builders`: the manifests of the children (RayJob, InferenceService, the plan ConfigMap, the
  stage's ServiceAccount and Role, Events), rendered for Pod Security `restricted`.
"""
