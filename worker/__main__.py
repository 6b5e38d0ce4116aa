"""``python -m worker``: start a worker on the queue of this machine's device class.

One worker process per GPU (solo pool); the queue is ``gpu`` when CUDA is available and
``cpu`` otherwise, unless ``DISTILLERY_WORKER_QUEUE`` names one. A worker that runs each job on
several GPUs (``DISTILLERY_WORKER_GPUS`` > 1, data-parallel: :mod:`kd_engine.torchrun`)
consumes ``gpu-multi``.
"""

from __future__ import annotations

import os
import sys

import torch

from kd_engine.ranks import worker_gpus
from worker.celery_app import app


def main() -> None:
    """Run the Celery worker in the foreground."""
    queue = os.environ.get("DISTILLERY_WORKER_QUEUE") or (
        ("gpu-multi" if worker_gpus() > 1 else "gpu") if torch.cuda.is_available() else "cpu"
    )
    app.worker_main(
        [
            "worker",
            "--pool",
            "solo",
            "-Q",
            queue,
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            *sys.argv[1:],
        ]
    )


if __name__ == "__main__":
    main()
