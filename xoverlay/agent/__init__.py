"""The per-node agent: the reconcile loop, repair, the DNS responder, metrics."""
