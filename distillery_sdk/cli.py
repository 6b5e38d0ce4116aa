"""``distillery``: the command line of Distillery (typer + rich), on :class:`Client`.

The API URL and key come from ``--url``/``--api-key``, then ``DISTILLERY_URL``/
``DISTILLERY_API_KEY``, then ``~/.config/distillery/config.toml`` (``DISTILLERY_CONFIG``
overrides the path); see :mod:`distillery_sdk.config`. An API error prints its code, field and
message in red and exits 1.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from distillery_sdk.client import Client
from distillery_sdk.config import ConfigError, config_path, resolve
from distillery_sdk.contracts import JobMetrics
from distillery_sdk.errors import DistilleryError
from distillery_sdk.models import Event, Job

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    add_completion=False,
    rich_markup_mode="markdown",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distillery: knowledge distillation jobs over HTTP. The API URL and key come from "
    "--url/--api-key, then DISTILLERY_URL/DISTILLERY_API_KEY, then "
    "~/.config/distillery/config.toml (url = ..., api_key = ...; DISTILLERY_CONFIG names "
    "another file).",
)
files_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Upload, list and delete datasets and models.",
)
keys_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode="markdown", help="Create, list and revoke API keys."
)
app.add_typer(files_app, name="files")
app.add_typer(keys_app, name="keys")

P = ParamSpec("P")
R = TypeVar("R")


class Output(StrEnum):
    """What a command prints on stdout: ``text`` (tables and lines, for people) or ``json``
    (one JSON document, or one JSON object a line for ``watch`` and ``events``)."""

    text = "text"
    json = "json"


OutputOpt = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="text (for people) or json (for scripts; watch and events: one object a line).",
    ),
]
WIDE = 10_000
"""Columns of a table printed into a file or a pipe: its natural width, never cut."""
ID_WIDTH = 37
"""Width of an id column: a job id (36) or an upload's (``file-`` and 32 hex); never cut."""


def _json(data: Any) -> None:
    """``data`` as JSON on stdout, as it is (no markup, no wrapping)."""
    typer.echo(json.dumps(data, default=str))


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")


def _table(*columns: str, ids: Iterable[str] = ("id",)) -> Table:
    """A table whose id columns are never cut or wrapped (they are copied into commands);
    the other columns wrap rather than being shortened with an ellipsis."""
    table = Table()
    for col in columns:
        if col in ids:
            table.add_column(col, no_wrap=True, min_width=ID_WIDTH)
        else:
            table.add_column(col, overflow="fold")
    return table


def _print_table(table: Table) -> None:
    """Print ``table``; into a file or a pipe as wide as it needs (no terminal to fit)."""
    if console.is_terminal:
        console.print(table)
    else:  # a console's print never goes wider than the console: a wide one for this table
        Console(file=console.file, width=WIDE, highlight=False).print(table)


def _pairs(values: list[str] | None, option: str) -> dict[str, str]:
    """``key=value`` options as a dict.

    Raises:
        typer.Exit: a value without ``=`` (the message names the option).
    """
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise _fail(f"error: {option} {v!r}: expected key=value")
        out[key] = value
    return out


@dataclass
class Options:
    """The global options, kept in the click context."""

    url: str | None = None
    api_key: str | None = None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]{escape(message)}[/]")
    return typer.Exit(code)


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Print a :class:`DistilleryError` or :class:`ConfigError` in red (code, field, message)
    and exit 1 instead of a traceback; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except DistilleryError as e:
            status = f" (HTTP {e.status})" if e.status else ""
            field = f"\n  field: {e.field}" if e.field else ""
            raise _fail(f"error: {e.code}{status}{field}\n  {e.message}") from None
        except ConfigError as e:
            raise _fail(f"error: {e}") from None
        except KeyboardInterrupt:
            raise _fail("interrupted", 130) from None

    return wrapper


def _client(ctx: typer.Context) -> Client:
    opts: Options = ctx.find_root().obj or Options()
    cfg = resolve(opts.url, opts.api_key)
    if not cfg.api_key:
        raise _fail(
            "error: no API key. Pass --api-key, set DISTILLERY_API_KEY, or put "
            f'api_key = "dk_..." in {config_path()}. `distillery-server up` (`make up`) prints '
            "the key of the embedded stack (kept in var/stack/api_key)."
        )
    return Client(cfg.url, cfg.api_key)


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str | None, typer.Option("--url", help="API base URL (default http://127.0.0.1:8000).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="API key (dk_...).", show_default=False)
    ] = None,
) -> None:
    ctx.obj = Options(url=url, api_key=api_key)


# -- the stack -------------------------------------------------------------------------------


SERVER_SCRIPT = "distillery-server"
"""The server distribution's console script; ``distillery up`` runs its ``up``."""
SERVER_MISSING = (
    "error: `distillery up` runs the embedded Distillery server stack, which comes with the "
    "server (the `distillery` distribution), not with the SDK (distillery-sdk).\n"
    "  In a Distillery checkout: `make up`, or `make setup` and then "
    "`.venv/bin/distillery-server up`.\n"
    "  Or install the server next to the SDK (`pip install ./distillery_sdk .` in a checkout) "
    "and run `distillery-server up`.\n"
    "  The other commands need only a running API: --url/DISTILLERY_URL and an API key."
)


def _server_main() -> Callable[[list[str], str], None] | None:
    """The server's command line (the ``distillery-server`` console script's function, which
    takes ``(argv, prog_name)``), when the server distribution is installed; else None."""
    for entry in entry_points(group="console_scripts", name=SERVER_SCRIPT):
        server_main: Callable[[list[str], str], None] = entry.load()
        return server_main
    return None


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def up(ctx: typer.Context) -> None:
    """Run the embedded server stack until Ctrl-C: the server's `distillery-server up` (same
    options; --help lists them). Needs the Distillery server installed, not only the SDK; says
    what to install when it is missing."""
    server_main = _server_main()
    if server_main is None:
        raise _fail(SERVER_MISSING, 2)
    server_main(["up", *ctx.args], "distillery")


# -- jobs ------------------------------------------------------------------------------------


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _fail(f"error: cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise _fail(
            f"error: {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if not isinstance(data, dict):
        raise _fail(f"error: {path}: a job spec is a mapping (teacher, method, dataset...)")
    return data


@app.command()
@handle_errors
def submit(
    ctx: typer.Context,
    spec_file: Annotated[
        Path, typer.Argument(help="The job spec, YAML (.yaml, .yml) or JSON (.json).")
    ],
    wait: Annotated[bool, typer.Option("--wait", help="Then watch it as `watch` does.")] = False,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retry-safe submit: the same key returns the same job.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="A name for the job (at most 128 characters).")
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(help="A label key=value (repeat it; at most 16).", show_default=False),
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Submit a job; prints its id (alone on stdout, for scripts; -o json: the job). --name
    and --metadata override those of the spec file. With --wait, watch it and exit non-zero
    unless it succeeds."""
    client = _client(ctx)
    labels = _pairs(metadata, "--metadata") if metadata else None
    job = client.submit(
        _load_spec(spec_file), idempotency_key=idempotency_key, name=name, metadata=labels
    )
    if output is Output.json:
        _json(_dump(job))
    else:
        console.print(job.id)
    if wait:
        raise typer.Exit(_watch(client, job.id, output=output))


def _stage_total(job: Job) -> tuple[str, int, int]:
    p = job.progress
    if p is None:
        return job.status, 0, 1
    name = p.stage if not p.num_stages else f"{p.stage} ({p.stage_index}/{p.num_stages})"
    if p.stage_steps:
        return name, p.stage_step, p.stage_steps
    return name, p.step, max(1, p.total_steps)


def _progress_line(job: Job) -> str:
    """One line of a job's progress: ``running train (1/1) 3/10 epoch 1 loss 0.5123``."""
    stage, done, total = _stage_total(job)
    p = job.progress
    line = f"{time.strftime('%H:%M:%S')} {job.status}"
    if p is not None:
        losses = " ".join(f"{k} {v:.4g}" for k, v in p.losses.items())
        line += f" {stage} {done}/{total} step {p.step}/{p.total_steps} epoch {p.epoch} {losses}"
    return line.rstrip()


def _watch(client: Client, job_id: str, poll_s: float = 2.0, output: Output = Output.text) -> int:
    """Show the job's progress until it finishes; the exit code (0 only for succeeded). On a
    terminal: a progress bar per stage; into a file or pipe: one line per change (-o json: the
    job as one JSON object a line)."""
    if output is Output.json or not console.is_terminal:
        last = [""]

        def line(job: Job) -> None:
            text = _progress_line(job)
            key = text.split(" ", 1)[1] if " " in text else text  # without the time
            if key != last[0]:
                last[0] = key
                if output is Output.json:
                    _json(_dump(job))
                else:
                    console.print(escape(text), soft_wrap=True)

        job = client.wait(job_id, on_progress=line, poll_s=poll_s)
        return _report_final(client, job, output)
    tasks: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:

        def update(job: Job) -> None:
            stage, done, total = _stage_total(job)
            p = job.progress
            losses = " ".join(f"{k} {v:.4g}" for k, v in (p.losses if p else {}).items())
            info = f"{job.status}"
            if p is not None:
                info += f" step {p.step}/{p.total_steps} epoch {p.epoch} {losses}"
            if stage not in tasks:
                for t in tasks.values():  # a new stage: the earlier ones are done
                    task = bar.tasks[t]
                    bar.update(t, completed=task.total)
                tasks[stage] = bar.add_task(stage, total=total, info=info)
            bar.update(tasks[stage], completed=min(done, total), total=total, info=info)

        job = client.wait(job_id, on_progress=update, poll_s=poll_s)
    return _report_final(client, job, output)


def _report_final(client: Client, job: Job, output: Output = Output.text) -> int:
    if job.status == "succeeded":
        if output is Output.json:
            return 0  # the last line was the succeeded job
        console.print(f"[bold green]job {job.id} succeeded[/]")
        final = client.metrics(job.id).final or JobMetrics()
        _print_metrics(final, job.method)
        return 0
    if job.status == "failed":
        err_console.print(f"[red]job {job.id} failed: {escape(job.error or 'no reason')}[/]")
        return 1
    err_console.print(f"[yellow]job {job.id} {job.status}[/]")
    return 1


def _figures(block: BaseModel | None) -> dict[str, Any]:
    """A ``metrics.json`` block's keys as stored (absent ones left out)."""
    return block.model_dump(mode="json", exclude_unset=True) if block is not None else {}


def _print_metrics(final: JobMetrics, method: str = "") -> None:
    """The test metrics of the student (and of the teacher, for a KD job) with their size and
    speed, then the teacher agreement and where the best dev score was. One row per metric
    and a column per model, so that no name or value is cut; a finetune job's model is the
    fine-tuned teacher, not a student."""
    trained = "teacher (fine-tuned)" if method == "finetune" else "student"
    rows: dict[str, dict[str, Any]] = {
        trained: {**(final.test or {}), **_figures(final.student)},
    }
    if final.teacher_test or final.teacher:
        rows["teacher"] = {**(final.teacher_test or {}), **_figures(final.teacher)}
    names = [
        n
        for n in dict.fromkeys(k for r in rows.values() for k in r)
        if any(isinstance(r.get(n), int | float) for r in rows.values())
    ]
    table = Table(title="test metrics")
    table.add_column("metric", no_wrap=True)
    for model in rows:
        table.add_column(model, justify="right", no_wrap=True)
    for n in names:
        table.add_row(n, *(_fmt(r.get(n)) for r in rows.values()))
    _print_table(table)
    for k, v in (
        ("teacher_agreement", final.teacher_agreement),
        ("best_epoch", final.best_epoch),
        ("best_stage", final.best_stage),
        ("train_seconds", final.train_seconds),
    ):
        if v is not None:
            console.print(f"{k}: {_fmt(v)}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@app.command()
@handle_errors
def watch(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    poll_s: Annotated[float, typer.Option(help="Seconds between two polls.")] = 2.0,
    output: OutputOpt = Output.text,
) -> None:
    """Watch a job: a progress bar per stage (step/total, latest losses) until it finishes,
    then its final status and test metrics. Into a file or a pipe, one line per progress
    change instead (-o json: the job as JSON, one object a line). Exit code 0 when it
    succeeded, 1 when it failed (the reason printed) or was cancelled."""
    raise typer.Exit(_watch(_client(ctx), job_id, poll_s=poll_s, output=output))


@app.command("list")
@handle_errors
def list_jobs(
    ctx: typer.Context,
    status: Annotated[
        str | None,
        typer.Option(help="Only jobs in this status (queued, running, succeeded, failed...)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many jobs.")] = 20,
    name: Annotated[str | None, typer.Option(help="Only jobs with this exact name.")] = None,
    name_contains: Annotated[
        str | None, typer.Option(help="Only jobs whose name holds this (any case).")
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(help="Only jobs with this label key=value (repeat: all must match)."),
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Jobs, newest first: id (whole), name, status, method, stage, created, metadata."""
    client = _client(ctx)
    jobs = client.list(
        status=status,
        page_size=min(limit, 200),
        name=name,
        name_contains=name_contains,
        metadata=_pairs(metadata, "--metadata") or None,
    )
    rows = [job for _, job in zip(range(limit), jobs, strict=False)]
    if output is Output.json:
        _json([_dump(j) for j in rows])
        return
    table = _table("id", "name", "status", "method", "stage", "created", "metadata")
    for job in rows:
        table.add_row(
            job.id,
            job.name or "",
            job.status,
            job.method,
            job.progress.stage if job.progress else "",
            job.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            " ".join(f"{k}={v}" for k, v in job.metadata.items()),
        )
    _print_table(table)


def _print_job(job: Job, output: Output = Output.text) -> None:
    if output is Output.json:
        _json(_dump(job))
    else:
        console.print_json(job.model_dump_json())


def _print_status(job: Job, output: Output) -> None:
    if output is Output.json:
        _json(_dump(job))
    else:
        console.print(f"job {job.id} {job.status}")


@app.command()
@handle_errors
def get(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    output: OutputOpt = Output.text,
) -> None:
    """A job as JSON: name, metadata, status, spec, progress, error, timestamps (-o json: on
    one line, without colours)."""
    _print_job(_client(ctx).get(job_id), output)


@app.command()
@handle_errors
def cancel(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    output: OutputOpt = Output.text,
) -> None:
    """Cancel a job (a running one stops within a few steps)."""
    _print_status(_client(ctx).cancel(job_id), output)


@app.command()
@handle_errors
def pause(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    output: OutputOpt = Output.text,
) -> None:
    """Pause a queued or running job (a running one after writing a checkpoint)."""
    _print_status(_client(ctx).pause(job_id), output)


@app.command()
@handle_errors
def resume(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    output: OutputOpt = Output.text,
) -> None:
    """Resume a paused job from its newest checkpoint."""
    _print_status(_client(ctx).resume(job_id), output)


@app.command()
@handle_errors
def download(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    dest_dir: Annotated[Path, typer.Argument(help="Folder to write the files into.")],
    output: OutputOpt = Output.text,
) -> None:
    """Download a succeeded job's files (a transformers model directory plus metrics.json,
    train_log.jsonl...) into DEST_DIR, checking each file's sha256 against the listing
    (-o json: a list of name, path, size_bytes, sha256)."""
    written: list[dict[str, Any]] = []

    def done(a: Any, path: Path) -> None:
        written.append({"name": a.name, "path": str(path), "size_bytes": a.size_bytes,
                        "sha256": a.sha256})  # fmt: skip
        if output is Output.text:
            console.print(f"{path}  {a.size_bytes} bytes  sha256 ok")

    paths = _client(ctx).download(job_id, dest_dir, on_file=done)
    if output is Output.json:
        _json(written)
    else:
        console.print(f"[green]{len(paths)} files in {dest_dir}[/]")


@app.command()
@handle_errors
def report(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    dest: Annotated[
        Path, typer.Argument(help="File (or folder, for report.html) to write.")
    ] = Path("report.html"),
    output: OutputOpt = Output.text,
) -> None:
    """Save a succeeded job's HTML report (quality, calibration, confusion matrices, learning
    curves, latency and size; open it in a browser)."""
    path = _client(ctx).download_report(job_id, dest)
    if output is Output.json:
        _json({"path": str(path)})
    else:
        console.print(f"[green]{path}[/]")


def _print_event(e: Event) -> None:
    color = {"warning": "yellow", "error": "red"}.get(e.level, "")
    line = f"{e.id:>6} {e.time} {e.type:<10} {escape(e.message)}"
    console.print(f"[{color}]{line}[/]" if color else line)


@app.command()
@handle_errors
def events(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep following (Server-Sent Events) until it ends."),
    ] = False,
    after: Annotated[int | None, typer.Option(help="Only events with an id above this.")] = None,
    output: OutputOpt = Output.text,
) -> None:
    """A job's event log (id, time, type, message), oldest first; --follow streams new events
    live and ends with the job's final event (-o json: one event object a line)."""
    client = _client(ctx)
    stream = client.stream_events(job_id, after) if follow else client.events(job_id, after)
    for e in stream:
        if output is Output.json:
            _json(_dump(e))
        else:
            _print_event(e)


# -- files -----------------------------------------------------------------------------------


@files_app.command("upload")
@handle_errors
def files_upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A dataset file, or a model as .tar.gz/.zip.")],
    kind: Annotated[str, typer.Option(help="dataset or model.")] = "dataset",
    text_column: Annotated[str | None, typer.Option(help="A dataset's text column.")] = None,
    label_column: Annotated[str | None, typer.Option(help="A dataset's label column.")] = None,
    text_pair_column: Annotated[
        str | None, typer.Option(help="A dataset's second text column (pairs).")
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Upload a dataset or a model; prints its id (use it as dataset.source, teacher,
    student.model...) and what the checks found."""
    if kind not in ("dataset", "model"):
        raise _fail("error: --kind must be dataset or model")
    if not path.is_file():
        raise _fail(f"error: {path}: no such file")
    form = {
        k: v
        for k, v in (
            ("text_column", text_column),
            ("label_column", label_column),
            ("text_pair_column", text_pair_column),
        )
        if v
    }
    f = _client(ctx).upload_file(path, kind, **form)
    if output is Output.json:
        _json(_dump(f))
        return
    console.print(f.id)
    err_console.print_json(json.dumps(f.report))


@files_app.command("list")
@handle_errors
def files_list(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="Only dataset or model files.")] = None,
    output: OutputOpt = Output.text,
) -> None:
    """The uploads, newest first: id (whole), kind, name, status (uploading, ready, or failed
    with its reason), size, created."""
    files = _client(ctx).list_files(kind)
    if output is Output.json:
        _json([_dump(f) for f in files])
        return
    table = _table("id", "kind", "filename", "status", "bytes", "created")
    for f in files:
        status = f"{f.status}: {f.error}" if f.error else f.status
        table.add_row(
            f.id,
            f.purpose,
            f.filename,
            status,
            str(f.size_bytes),
            f.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    _print_table(table)


@files_app.command("delete")
@handle_errors
def files_delete(
    ctx: typer.Context,
    file_id: Annotated[str, typer.Argument(help="The file's id.")],
    output: OutputOpt = Output.text,
) -> None:
    """Delete an upload (refused while an unfinished job names it)."""
    _client(ctx).delete_file(file_id)
    if output is Output.json:
        _json({"deleted": file_id})
    else:
        console.print(f"deleted {file_id}")


# -- keys ------------------------------------------------------------------------------------


@keys_app.command("create")
@handle_errors
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A label, e.g. ci.")] = "",
    output: OutputOpt = Output.text,
) -> None:
    """Create an API key of your tenant; prints the key (shown only this once)."""
    k = _client(ctx).create_key(name)
    if output is Output.json:
        _json(_dump(k))
        return
    console.print(k.key)
    err_console.print(f"key {k.id} ({k.prefix}...) created; keep it, it is not shown again")


@keys_app.command("list")
@handle_errors
def keys_list(ctx: typer.Context, output: OutputOpt = Output.text) -> None:
    """The tenant's keys (never their secrets): id (whole), prefix, name, created, revoked."""
    keys = _client(ctx).list_keys()
    if output is Output.json:
        _json([_dump(k) for k in keys])
        return
    table = _table("id", "prefix", "name", "created", "revoked")
    for k in keys:
        table.add_row(
            k.id,
            k.prefix,
            k.name,
            k.created_at.strftime("%Y-%m-%d %H:%M"),
            k.revoked_at.strftime("%Y-%m-%d %H:%M") if k.revoked_at else "",
        )
    _print_table(table)


@keys_app.command("revoke")
@handle_errors
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key's id.")],
    output: OutputOpt = Output.text,
) -> None:
    """Revoke a key: it answers 401 from now on."""
    k = _client(ctx).revoke_key(key_id)
    if output is Output.json:
        _json(_dump(k))
    else:
        console.print(f"revoked {k.id} ({k.prefix}...)")


def main() -> None:
    """The console script ``distillery``."""
    app()


if __name__ == "__main__":
    main()
