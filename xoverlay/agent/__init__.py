"""The per-node agent: `up` and `down`, the reconcile loop, repair, the DNS responder, metrics."""
