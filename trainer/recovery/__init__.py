"""In-place recovery: a lost rank is replaced without stopping the others (issue 13, being built).

Modules: snapshot (in-memory snapshots of a rank's training state, double-buffered, with the committed step agreed
by every rank), replicate (each snapshot's replica on a rank of the next node, exchanged in the background),
regroup (the process groups re-formed inside the running processes, with the replacement, round by round on the
job's recovery store), engine (the parallel engine's state as a snapshot holds it, and its restore after a
rebind), coordinator (the per-attempt process hosting the recovery store and the controller's HTTP API), inplace (a
rank's part: membership in the rounds, snapshots each step, the restore after a regroup; used by trainer/runtime.py).
docs/architecture.md says how they fit and what is still to build.
"""
