"""One job on several devices: :func:`kd_engine.run.run_job` on N data-parallel ranks started
by ``torchrun`` (``torch.distributed.run``, shipped with torch: no new dependency).

:func:`run_job_distributed` (the caller's side, e.g. the worker) writes the job into a
private run directory and runs, as a subprocess::

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N \\
        -m kd_engine.torchrun RUN_DIR

Each rank (:func:`main`) joins the process group (:func:`kd_engine.ranks.joined`: ``nccl``
with one GPU per rank when the job trains on CUDA, else ``gloo`` on the CPU) and calls
:func:`~kd_engine.run.run_job`. The run directory is the only channel between the caller and
the ranks:

* ``job.json`` (caller -> ranks): the spec, model paths, the caller's answers for every
  dataset reference (resolved in the caller's process), the checkpoint policy and resume
  checkpoint, and the progress interval;
* ``events.jsonl`` (rank 0 -> caller): one JSON line per progress report, log record,
  checkpoint written (the caller calls its ``on_checkpoint`` and then writes ``ack-NAME``;
  rank 0 waits for it, so that a checkpoint is stored before training goes on, as in one
  process), and the end: ``result`` (metrics), ``paused`` (a pause checkpoint) or
  ``cancelled``;
* ``error-rankR.json`` (any rank -> caller): the exception that stopped rank R (a
  ``ValueError``, with its spec field when it was a :class:`~kd_engine.errors.SpecError`, is
  raised again as one in the caller: a user problem, not a crash);
* ``stop`` and ``pause`` (caller -> rank 0): flag files the caller creates when its hooks'
  ``should_stop`` / ``should_pause`` say so; rank 0 reads them at its progress reports and
  broadcasts the answer to every rank (:func:`kd_engine.trainer.train`).

What each rank does is described in :mod:`kd_engine.ranks` and docs/production.md
("Several GPUs for one job").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kd_engine.checkpoint import CheckpointPolicy, Paused, read_checkpoint_info
from kd_engine.errors import SpecError
from kd_engine.ranks import RankStopped, check_supported, joined
from kd_engine.run import RunResult, run_job
from kd_engine.spec import JobSpec
from kd_engine.trainer import Cancelled, Progress, TrainHooks

JOB_FILE, EVENTS_FILE = "job.json", "events.jsonl"
STOP_FLAG, PAUSE_FLAG = "stop", "pause"
POLL_S = 0.1
"""How often the caller reads the ranks' events and checks its hooks (seconds)."""


def _uses_cuda(spec: JobSpec) -> bool:
    import torch

    return spec.training.device != "cpu" and torch.cuda.is_available()


def _answers(spec: JobSpec, resolve: Callable[[str], Path]) -> dict[str, Any]:
    """The caller's answer for every dataset reference of ``spec``: a path, or the error
    ``resolve`` raised (raised again in the ranks, where the loader asks for it)."""
    d = spec.dataset
    refs = [d.source, d.dev_source, d.test_source, *(s.source for s in d.eval_sets)]
    refs.append(getattr(spec.method, "corpus", None))
    answers: dict[str, Any] = {}
    for ref in refs:
        if isinstance(ref, str) and ref not in answers:
            try:
                answers[ref] = {"path": str(resolve(ref))}
            except Exception as e:  # told to the rank that asks for it
                answers[ref] = _error_record(e)
    return answers


def _error_record(e: BaseException) -> dict[str, Any]:
    record: dict[str, Any] = {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, SpecError):
        record.update(field=e.field, reason=e.reason)
    elif isinstance(e, ValueError):
        record["value_error"] = True
    return record


def _raise_error(record: dict[str, Any]) -> None:
    if "field" in record:
        raise SpecError(record["field"], record["reason"])
    if record.get("value_error"):
        raise ValueError(record["message"])
    raise RuntimeError(f"{record['type']}: {record['message']}")


def run_job_distributed(
    spec: JobSpec,
    teacher_path: Path | str,
    resolve: Callable[[str], Path],
    out_dir: Path,
    world_size: int,
    hooks: TrainHooks | None = None,
    student_path: Path | str | None = None,
    generator_path: Path | str | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume_from: Path | None = None,
) -> RunResult:
    """:func:`kd_engine.run.run_job` on ``world_size`` ranks started by ``torchrun`` (one GPU
    each when ``training.device`` is not ``cpu`` and CUDA is available, else CPU processes
    with gloo); the arguments mean what they mean there. With ``world_size`` 1 this is
    :func:`run_job` in this process.

    ``resolve`` is called here for every dataset reference of the spec. ``hooks`` are called
    here with rank 0's progress, log records and checkpoints; ``should_stop`` and
    ``should_pause`` are polled here and relayed to the ranks. Rank 0 writes the student,
    metrics and checkpoints into ``out_dir`` and ``checkpoints.directory``.

    Returns:
        a :class:`~kd_engine.run.RunResult` (rank 0's metrics; the student in ``out_dir``).

    Raises:
        ValueError: :func:`~kd_engine.ranks.check_supported` refused the job, or a rank
            raised one (a user problem, as in :func:`run_job`; a
            :class:`~kd_engine.errors.SpecError` keeps its field).
        kd_engine.trainer.Cancelled: the job was cancelled through ``hooks.should_stop``.
        kd_engine.checkpoint.Paused: the job paused through ``hooks.should_pause``.
        RuntimeError: a rank failed otherwise, or the ranks ended without a result.
    """
    hooks = hooks or TrainHooks()
    if world_size <= 1:
        return run_job(
            spec,
            teacher_path,
            resolve,
            out_dir,
            hooks,
            student_path,
            generator_path,
            checkpoints,
            resume_from,
        )
    check_supported(spec, world_size)
    use_cuda = _uses_cuda(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="distillery-ranks-"))
    try:
        job = {
            "spec": spec.model_dump(mode="json"),
            "teacher": str(teacher_path),
            "refs": _answers(spec, resolve),
            "out_dir": str(out_dir),
            "student": str(student_path) if student_path is not None else None,
            "generator": str(generator_path) if generator_path is not None else None,
            "checkpoints": {**asdict(checkpoints), "directory": str(checkpoints.directory)}
            if checkpoints is not None
            else None,
            "resume_from": str(resume_from) if resume_from is not None else None,
            "every": hooks.every,
            "use_cuda": use_cuda,
        }
        (run_dir / JOB_FILE).write_text(json.dumps(job), encoding="utf-8")
        return _follow(run_dir, world_size, hooks, out_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _command(run_dir: Path, world_size: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(world_size),
        "-m",
        "kd_engine.torchrun",
        str(run_dir),
    ]


def _follow(run_dir: Path, world_size: int, hooks: TrainHooks, out_dir: Path) -> RunResult:
    """Start torchrun and relay the ranks' events to ``hooks`` until it exits."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    events = run_dir / EVENTS_FILE
    events.touch()
    process = subprocess.Popen(
        _command(run_dir, world_size), env=env, start_new_session=True, cwd=os.getcwd()
    )
    end: dict[str, Any] | None = None
    try:
        with events.open("r", encoding="utf-8") as stream:
            buffer = ""
            while True:
                exited = process.poll() is not None
                buffer += stream.read()
                *lines, buffer = buffer.split("\n")
                for line in lines:
                    event = json.loads(line)
                    end = _relay(event, hooks, run_dir) or end
                if exited:
                    break
                if hooks.should_stop():
                    (run_dir / STOP_FLAG).touch()
                if hooks.should_pause():
                    (run_dir / PAUSE_FLAG).touch()
                time.sleep(POLL_S)
    finally:
        if process.poll() is None:  # the caller failed (or was interrupted): stop the ranks
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for path in sorted(run_dir.glob("error-rank*.json")):
        _raise_error(json.loads(path.read_text(encoding="utf-8")))
    if end is None or process.returncode != 0:
        raise RuntimeError(f"torchrun ended with code {process.returncode} and no result")
    if end["kind"] == "cancelled":
        raise Cancelled()
    if end["kind"] == "paused":
        raise Paused(read_checkpoint_info(Path(end["path"])))
    return RunResult(metrics=end["metrics"], out_dir=out_dir)


def _relay(event: dict[str, Any], hooks: TrainHooks, run_dir: Path) -> dict[str, Any] | None:
    """Call ``hooks`` with one event of rank 0; returns it when it ends the run."""
    kind = event["kind"]
    if kind == "progress":
        hooks.on_progress(Progress(**event["progress"]))
    elif kind == "log":
        hooks.log(event["record"])
    elif kind == "checkpoint":
        saved = read_checkpoint_info(Path(event["path"]))
        try:
            hooks.on_checkpoint(saved)
        finally:  # rank 0 waits for it (a failing hook then stops the ranks)
            (run_dir / f"ack-{saved.name}").touch()
    else:
        return event
    return None


# --- the ranks' side -----------------------------------------------------------------------


class _Events:
    """Rank 0's writer of ``events.jsonl`` (one flushed JSON line per event)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.stream = (run_dir / EVENTS_FILE).open("a", encoding="utf-8")

    def put(self, kind: str, **payload: Any) -> None:
        self.stream.write(json.dumps({"kind": kind, **payload}, default=str) + "\n")
        self.stream.flush()

    def checkpoint(self, saved: Any) -> None:
        """Report a checkpoint and wait until the caller has handled it."""
        self.put("checkpoint", path=str(saved.path))
        ack = self.run_dir / f"ack-{saved.name}"
        while not ack.exists():
            time.sleep(POLL_S / 2)


def _resolver(answers: dict[str, Any]) -> Callable[[str], Path]:
    def resolve(ref: str) -> Path:
        answer = answers.get(ref)
        if answer is None:
            raise ValueError(f"dataset reference {ref!r} was not resolved before the ranks began")
        if "path" not in answer:
            _raise_error(answer)
        return Path(answer["path"])

    return resolve


def _rank_job(run_dir: Path, job: dict[str, Any], rank: int) -> None:
    spec = JobSpec.model_validate(job["spec"])
    every = int(job["every"])
    policy = job["checkpoints"]
    checkpoints = (
        CheckpointPolicy(**{**policy, "directory": Path(policy["directory"])}) if policy else None
    )
    resume = Path(job["resume_from"]) if job["resume_from"] else None
    args = (job["student"], job["generator"], checkpoints, resume)
    resolve = _resolver(job["refs"])
    if rank != 0:
        out = Path(tempfile.mkdtemp(prefix=f"distillery-rank{rank}-"))
        try:
            run_job(spec, job["teacher"], resolve, out, TrainHooks(every=every), *args)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    events = _Events(run_dir)
    hooks = TrainHooks(
        on_progress=lambda p: events.put("progress", progress=asdict(p)),
        should_stop=(run_dir / STOP_FLAG).exists,
        log=lambda r: events.put("log", record=r),
        every=every,
        on_checkpoint=events.checkpoint,
        should_pause=(run_dir / PAUSE_FLAG).exists,
    )
    try:
        result = run_job(spec, job["teacher"], resolve, Path(job["out_dir"]), hooks, *args)
    except Cancelled:
        events.put("cancelled")
        return
    except Paused as p:
        events.put("paused", path=str(p.checkpoint.path))
        return
    events.put("result", metrics=result.metrics)


def main(argv: list[str] | None = None) -> None:
    """One rank: ``python -m kd_engine.torchrun RUN_DIR`` under ``torchrun`` (see the module
    docstring). Exits 1 after writing ``error-rankR.json`` when the job raised."""
    run_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    job = json.loads((run_dir / JOB_FILE).read_text(encoding="utf-8"))
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rank = int(os.environ["RANK"])
    try:
        # a cancel or pause ends rank 0 with an event for the caller, the others quietly
        with joined(bool(job["use_cuda"])), contextlib.suppress(Cancelled, RankStopped):
            _rank_job(run_dir, job, rank)
    except BaseException as e:
        traceback.print_exc()  # into torchrun's output (the worker's log)
        (run_dir / f"error-rank{rank}.json").write_text(
            json.dumps(_error_record(e)), encoding="utf-8"
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
