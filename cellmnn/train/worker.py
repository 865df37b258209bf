"""A worker process of ``parallel``: ``python -m cellmnn.train.worker JOB OUT`` trains the members
of the job file as one ``train`` call in this process and writes the models, or the error that
stopped them, to OUT (atomically).  Both files are the parent's, in its temporary folder."""
from __future__ import annotations

import os
import sys

import torch

from .trainer import train


def main(job: str, out: str) -> None:
    """Train the members of ``job``; write {"models": [...]} or {"error": exception} to ``out``."""
    spec = torch.load(job, weights_only=False)
    torch.set_num_threads(spec["threads"])
    try:
        result = {"models": train(spec["marginals"], spec["members"], embed=spec["embed"], n_jobs=1)}
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        result = {"error": exc}
    tmp = out + ".part"
    torch.save(result, tmp)
    os.replace(tmp, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
