"""Level-based reconciliation of the five kinds: what the operator wants to exist, and doing it.

- `store`: the operator's view of the cluster, filled from kopf's watches (fmforge objects and
  their RayJob/InferenceService children), and who depends on whom.
- `refs`: references resolved against that view (Waiting, cycles, inputs of a plan).
- `jobs`, `deployment`: one pure `decide(obj, world, children, settings)` per kind: the children
  to create, update or delete and the status to write, from plain dicts.
- `core`: the reconciler that carries out a decision through `fmforge.kube.client`, writes status
  once (only when it changed) and posts Events on transitions.
- `queue`: the work queue that runs reconciles, one at a time per object, with retries by error type.
- `metrics`: Prometheus metrics of all of the above.

`fmforge.handlers` (kopf) feeds the store and the queue; nothing here imports kopf's decorators.
"""
