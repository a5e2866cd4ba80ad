"""The Kubernetes side of fmforge: the only package that talks to the API server.

`names` holds the deterministic names, labels and owner references of child objects; the
client, server-side apply and the RayJob/InferenceService builders join it with the operator.
"""
