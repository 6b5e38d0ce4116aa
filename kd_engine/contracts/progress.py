"""The progress record of a running job (the trainer reports it, ``jobs.progress`` stores it,
the API serves it): :class:`Progress`. Pure pydantic."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from pydantic import Field
from pydantic.dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where a running job is (the trainer's report, the API's ``progress`` field, stored in
    ``jobs.progress``): stage (``prepare``, a training stage of the method such as ``tinybert
    intermediate`` or ``annealing T=3/7``, ``teacher cache``, ``evaluate``, ``export``,
    ``done``) and its position (``stage_index`` of ``num_stages``), epochs and optimiser steps
    over the whole job and within the stage, and the latest losses (mean over the epoch so far).
    A job that trains several models (``takd``, ``born_again``, ``teacher_free_self``) also says
    which (``hop`` of ``num_hops``; its stage names start with ``hop 2/3 assistant_2: ``), and
    its epochs and steps then count within that model's training. In an adversarial stage
    (``mate_kd`` and its family) ``phase`` says whose steps a report is about: ``generator``
    (its max steps; ``losses`` holds the divergence reached, ``generator_kl`` or
    ``generator_mse``) or ``student`` (the min steps; the method's losses).

    Attributes:
        stage: the stage's name.
        epoch: epochs begun over the whole job (1-based; 0 outside training).
        step: optimiser steps taken over the whole job.
        total_steps: optimiser steps the whole job will take.
        losses: mean losses since the epoch began (or the dev metric, on evaluation).
        stage_index: 1-based position of the stage (0 outside training).
        num_stages: how many training stages the job has.
        stage_epoch: epochs begun within the stage.
        stage_step: optimiser steps taken within the stage.
        stage_steps: optimiser steps the stage will take.
        hop: 1-based position of the model being trained in a job that trains several, 0 when
            not set.
        num_hops: how many models the job trains (0 when not set).
        phase: ``generator``, ``student`` or '' (see above).
    """

    stage: str
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    stage_index: int = 0
    num_stages: int = 0
    stage_epoch: int = 0
    stage_step: int = 0
    stage_steps: int = 0
    hop: Annotated[
        int, Field(description="Which model of a multi-model job is training (1-based).")
    ] = 0
    num_hops: Annotated[
        int, Field(description="How many models the job trains (takd, born_again).")
    ] = 0
    phase: Annotated[
        str,
        Field(
            description="Within an adversarial stage (mate_kd and its family): 'generator' for "
            "a report of the generator's max steps (losses: the divergence they reached, e.g. "
            "generator_kl) and 'student' for the student's min steps; '' otherwise."
        ),
    ] = ""
