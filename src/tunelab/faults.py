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
          "cache.shard", "merge.write")
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, nth = spec.partition(":")
    if where != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
