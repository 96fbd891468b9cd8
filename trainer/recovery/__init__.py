"""In-place recovery: a lost rank is replaced without stopping the others (issue 13, being built).

Modules: snapshot (in-memory snapshots of a rank's training state, double-buffered, with the committed step agreed
by every rank), replicate (each snapshot's replica on a rank of the next node, exchanged in the background).
"""
