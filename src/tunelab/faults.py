"""Fault points: where the reliability suite kills a real tunelab process on purpose.

`point("checkpoint.write")` does nothing unless the environment variable `TUNELAB_FAULT` names
that point: `TUNELAB_FAULT="checkpoint.write:3"` sends SIGKILL to this process the 3rd time the
point is reached (default: the 1st). Points sit where a power cut hurts most: inside a
checkpoint's bytes, between a state's files and its rename, inside a latent shard, inside a
merge's output. tests/reliability/ uses them to prove that a run killed there resumes to the
same weights and that no half-written file is ever read as a good one (docs/reliability.md).
The cost when unset is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "TUNELAB_FAULT"
POINTS = ("checkpoint.write", "checkpoint.rename", "state.files", "state.rename", "metrics.write",
          "cache.shard", "merge.write", "loss.nonfinite")
_hits: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if the fault spec names this point and this is its hit."""
    if hit(name):
        os.kill(os.getpid(), signal.SIGKILL)


def hit(name: str) -> bool:
    """Whether this pass of point `name` is a fault: the spec `name:N` (the N-th pass), `name:N-M`
    (passes N to M) or `name:N-` (the N-th and every later one). For faults that are not a kill,
    e.g. `loss.nonfinite` (the trainer makes that micro-batch's loss NaN)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    where, _, nth = spec.partition(":")
    if where != name:
        return False
    _hits[name] = count = _hits.get(name, 0) + 1
    first, dash, last = (nth or "1").partition("-")
    if not dash:
        return count == int(first)
    return count >= int(first) and (not last or count <= int(last))
