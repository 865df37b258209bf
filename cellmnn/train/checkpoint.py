"""What a training checkpoint must match to be continued: a fingerprint of the data and of every
member's settings, compared field by field so that a refusal names what differs.  (The file
itself is written and read by ``cellmnn.files``: atomically, and never over a foreign file.)"""
from __future__ import annotations

import hashlib

import numpy as np


RUN_OPTIONS = ("verbose", "n_jobs", "cuda_graph")  # how a run is carried out, not what it computes: free on resume


def fingerprint(marginals, members: list) -> dict:
    """The data (a SHA-256 of every timepoint's times and cells) and every member's settings."""
    h = hashlib.sha256()
    for m in (marginals if isinstance(marginals, (list, tuple)) else [marginals]):
        h.update(np.asarray(m.times, dtype=np.float64).tobytes())
        for d in m.data:
            h.update(np.ascontiguousarray(d, dtype=np.float64).tobytes())
    return {"data": h.hexdigest(),
            "members": [{"holdout": m.holdout, "seed": m.seed, "exclude": list(m.exclude), "dataset": m.dataset,
                         "joint": repr(m.joint),
                         "hp": {k: repr(v) for k, v in sorted(m.hp.to_dict().items()) if k not in RUN_OPTIONS}}
                        for m in members]}


def check_resume(saved: dict, now: dict, path) -> None:
    """Refuse to continue the checkpoint at ``path`` (fingerprint ``saved``) with a training of
    fingerprint ``now`` that differs; the error names what differs."""
    if saved["data"] != now["data"]:
        raise ValueError(f"checkpoint {path} was written for other data; refusing to continue it (use another "
                         "checkpoint path)")
    if len(saved["members"]) != len(now["members"]):
        raise ValueError(f"checkpoint {path} holds {len(saved['members'])} time courses, this training "
                         f"{len(now['members'])}; refusing to continue it")
    for a, b in zip(saved["members"], now["members"]):
        diff = [k for k in ("holdout", "seed", "exclude", "dataset", "joint") if a.get(k) != b.get(k)]
        diff += sorted(k for k in set(a["hp"]) | set(b["hp"]) if a["hp"].get(k) != b["hp"].get(k))
        if diff:
            raise ValueError(f"checkpoint {path} was written with other settings ({', '.join(diff)} differ); "
                             "refusing to continue it")
