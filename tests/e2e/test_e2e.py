"""End to end: uvicorn and a real Celery worker process against PostgreSQL and Redis.

Small real jobs (all-MiniLM-L6-v2 from its wheel, Rotten Tomatoes subsets, a few steps) go
through HTTP: finetune a teacher, distil it, download and load the student; cancel a running
job; deliver a task twice; a bad spec; a job that fails with a reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from core.queue import TASK_NAME, make_celery
from core.settings import Settings
from devstack.client import Client
from devstack.stack import DEVSTACK_TENANT, Stack, running_stack
from kd_engine import registry
from kd_engine.methods.chain import ChainMethod
from kd_engine.plan import overridden_training_fields, plan_job
from kd_engine.references import builtin_model_path
from kd_engine.spec import JobSpec
from tests.checks import NO_EXTRAS, check_classification_metrics

pytestmark = pytest.mark.e2e

SMALL_TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "learning_rate": 1e-4}
SMALL_DATA = {
    "source": "builtin:rotten_tomatoes",
    "max_train_examples": 64,
    "max_eval_examples": 32,
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    with running_stack(
        workdir,
        database_url=pg_url,
        broker_url=e2e_broker_url,
        extra_env={"DISTILLERY_PROGRESS_EVERY_STEPS": "1"},
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack.base_url, stack.api_key)


@pytest.fixture(scope="module")
def teacher(client: Client) -> dict[str, Any]:
    job = client.submit(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": SMALL_DATA,
            "training": SMALL_TRAINING,
            "export": NO_EXTRAS,  # the teacher of the tests below: their students are checked
        }
    )
    done = client.wait(job["id"], timeout_s=600)
    assert done["status"] == "succeeded", done["error"]
    return done


def test_finetune_then_vanilla_kd_downloads_a_student_that_loads(
    client: Client, teacher: dict[str, Any], tmp_path: Path
) -> None:
    job = client.submit(
        {
            "teacher": f"job:{teacher['id']}",
            "student": {"num_layers": 2},
            "method": {"name": "vanilla_kd", "alpha": 0.5, "temperature": 2.0},
            "dataset": SMALL_DATA,
            "training": SMALL_TRAINING,
        }
    )
    done = client.wait(job["id"], timeout_s=600)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1 and done["finished_at"] is not None

    listing = {a["name"]: a for a in client.artifacts(job["id"])["items"]}
    assert {
        "config.json",
        "model.safetensors",
        "metrics.json",
        "train_log.jsonl",
        "tokenizer.json",
        "split.json",
        "model.onnx",
    } <= set(listing)
    assert "model.int8.onnx" not in listing  # export.int8 is off by default
    split = client.http.get(listing["split.json"]["url"]).json()
    assert split["splits"]["test"]["source"] == "builtin:rotten_tomatoes"
    assert len(split["splits"]["test"]["rows"]) == SMALL_DATA["max_eval_examples"]
    blob = client.http.get(listing["model.safetensors"]["url"]).content
    assert len(blob) == listing["model.safetensors"]["size_bytes"]
    assert hashlib.sha256(blob).hexdigest() == listing["model.safetensors"]["sha256"]

    metrics = client.metrics(job["id"])
    assert len(metrics["epochs"]) == 1
    assert "accuracy" in metrics["epochs"][0]["dev"]
    final = metrics["final"]
    assert final["student"]["parameters"] < final["teacher"]["parameters"]
    check_classification_metrics(final, SMALL_DATA["max_eval_examples"])
    # The ONNX export (kd_engine.onnx_export): checked against PyTorch on the test split.
    exported = final["onnx"]
    assert exported["file"] == "model.onnx" and exported["opset"] == 17
    assert exported["bytes"] == listing["model.onnx"]["size_bytes"]
    assert exported["max_abs_diff_logits"] < 1e-4 and exported["prediction_agreement"] == 1.0
    assert exported["latency_s_batch1"]["onnxruntime"] > 0 and exported["int8"] is None
    blob = client.http.get(listing["model.onnx"]["url"]).content
    assert hashlib.sha256(blob).hexdigest() == listing["model.onnx"]["sha256"]

    student_dir = client.download_archive(job["id"], tmp_path)
    # The archive holds the ONNX model too; onnxruntime runs it on the tokenizer's output.
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(student_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feed = AutoTokenizer.from_pretrained(student_dir)(["a wonderful film"], return_tensors="np")
    [onnx_logits] = session.run(["logits"], {i.name: feed[i.name] for i in session.get_inputs()})
    assert onnx_logits.shape == (1, 2)
    model = AutoModelForSequenceClassification.from_pretrained(student_dir)
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert model.config.num_hidden_layers == 2
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    with torch.inference_mode():
        logits = model(
            **tok(["a wonderful film", "a dull mess"], return_tensors="pt", padding=True)
        ).logits
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


def test_cancel_of_a_running_job(client: Client) -> None:
    job = client.submit(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": {"source": "builtin:rotten_tomatoes"},
            "training": {**SMALL_TRAINING, "epochs": 3},
        }
    )
    deadline = time.monotonic() + 300
    while True:
        cur = client.job(job["id"])
        if cur["status"] == "running" and (cur["progress"] or {}).get("step", 0) > 0:
            break
        assert cur["status"] in ("queued", "running"), cur
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.5)
    assert client.cancel(job["id"])["status"] == "cancelling"
    done = client.wait(job["id"], timeout_s=120, poll_s=0.5)
    assert done["status"] == "cancelled"
    step_at_stop = done["progress"]["step"]  # the last step reported, not reset
    assert 0 < step_at_stop < done["progress"]["total_steps"]
    assert client.artifacts(job["id"])["items"] == []
    again = client.http.post(f"/v1/jobs/{job['id']}/cancel")  # finished: 409, stays cancelled
    assert again.status_code == 409, again.text
    assert client.job(job["id"])["status"] == "cancelled"


def test_a_teacher_and_its_student_submitted_at_once_run_in_order(client: Client) -> None:
    """The student names ``job:<teacher id>`` before the teacher has run: it waits, the worker
    queues it when the teacher succeeds, and it then runs to success."""
    small = {**SMALL_TRAINING, "max_steps": 2}
    teacher = client.submit(
        {
            "teacher": "builtin:minilm-l6",
            "student": {"num_layers": 2},
            "method": {"name": "finetune"},
            "dataset": SMALL_DATA,
            "training": small,
            "export": NO_EXTRAS,
        }
    )
    student = client.submit(
        {
            "teacher": f"job:{teacher['id']}",
            "student": {"num_layers": 1},
            "method": {"name": "vanilla_kd"},
            "dataset": SMALL_DATA,
            "training": small,
            "export": NO_EXTRAS,
        }
    )
    assert student["status"] == "waiting"
    done = client.wait(student["id"], timeout_s=900)
    assert done["status"] == "succeeded", done["error"]
    first = client.job(teacher["id"])
    assert first["status"] == "succeeded"
    assert first["finished_at"] <= done["started_at"]
    assert done["progress"]["stage"] == "done" and done["progress"]["step"] == 2


def test_a_task_delivered_twice_runs_once(client: Client, stack: Stack) -> None:
    job = client.submit(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": SMALL_DATA,
            # max_steps caps every stage of a multi-stage method
            "training": {**SMALL_TRAINING, "epochs": 2, "max_steps": 2},
            "export": NO_EXTRAS,
        }
    )
    celery = make_celery_for(stack)
    celery.send_task(TASK_NAME, args=[job["id"]], task_id=job["id"], queue="cpu")
    done = client.wait(job["id"], timeout_s=300)
    assert done["status"] == "succeeded", done["error"]
    # the worker logs a skip for the second delivery, and the job was claimed once
    log = stack.log_dir / "worker.log"
    deadline = time.monotonic() + 60
    while f"job {job['id']}: not claimable" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the second delivery was not processed"
        time.sleep(0.5)
    assert client.job(job["id"])["attempt"] == 1
    train_log = client.http.get(f"/v1/jobs/{job['id']}/artifacts/train_log.jsonl").text
    assert train_log.count('"stage": "prepare"') == 1


def queue_directly(stack: Stack, spec: dict[str, Any]) -> dict[str, Any]:
    """Store and queue a job of the stack's tenant (DEVSTACK_TENANT, whose key the client sends)
    without the API's submit checks; return it as the API shows it."""
    import uuid

    from core import repository, tenants
    from core.db import make_engine, make_sessionmaker
    from kd_engine.spec import JobSpec

    valid = JobSpec.model_validate(spec)
    engine = make_engine(stack.env["DISTILLERY_DATABASE_URL"])
    with make_sessionmaker(engine)() as s:
        tenant_id = tenants.ensure_tenant(s, DEVSTACK_TENANT).id
        job = repository.create_job(
            s,
            str(uuid.uuid4()),
            valid.method.name,
            valid.model_dump(mode="json"),
            tenant_id=tenant_id,
        )
        s.commit()
        job_id = job.id
    engine.dispose()
    make_celery_for(stack).send_task(TASK_NAME, args=[job_id], task_id=job_id, queue="cpu")
    return {"id": job_id}


def make_celery_for(stack: Stack) -> Any:
    return make_celery(Settings(broker_url=stack.env["DISTILLERY_BROKER_URL"]))


def test_bad_spec_is_422_over_real_http(stack: Stack) -> None:
    r = httpx.post(
        f"{stack.base_url}/v1/jobs",
        headers={"Authorization": f"Bearer {stack.api_key}"},
        json={
            "teacher": "builtin:minilm-l6",
            "method": {"name": "vanilla_kd", "temperature": 0},
            "dataset": SMALL_DATA,
        },
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "method.temperature"


def test_no_key_or_a_wrong_key_is_401_over_real_http(stack: Stack) -> None:
    for headers in ({}, {"Authorization": f"Bearer {stack.api_key[:-4]}AAAA"}):
        r = httpx.get(f"{stack.base_url}/v1/jobs", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{stack.base_url}/healthz").status_code == 200


def test_bad_data_is_refused_at_submit_with_a_reason(stack: Stack) -> None:
    """A data problem is a 422 at submit (the file is read then), never a job that fails
    after its wait in the queue."""
    data_root = Path(stack.env["DISTILLERY_DATA_ROOT"])
    (data_root / "wrong_columns.csv").write_text(
        "review,sentiment\n" + "".join(f"text {i},{i % 2}\n" for i in range(40))
    )
    r = httpx.post(
        f"{stack.base_url}/v1/jobs",
        headers={"Authorization": f"Bearer {stack.api_key}"},
        json={
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": {"source": "file://wrong_columns.csv"},
            "training": SMALL_TRAINING,
        },
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "dataset.text_column"
    assert "no column 'text'" in err["message"]
    assert "'review', 'sentiment'" in err["message"]


SMALL_AUGMENTATION = {
    "epochs": 1,
    "student_steps": 2,
    "generator_steps": 1,
    "generator_warmup_epochs": 1,
}
"""Small settings for a method that binds models (an augmentation method: mate_kd and its
family), each applied only where the method's settings have the field, so a newly registered
one runs here without being named."""
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    # its default corpus is 20,000 rows, each embedded by the teacher (70 s of the matrix's
    # ~5 min on 2 cores); 256 rows still retrieve its 32 neighbours per example
    "minimax_knn": {"max_corpus_examples": 256},
}
"""Per-method settings over the defaults (and over SMALL_AUGMENTATION), by method name."""


def matrix_method(name: str) -> dict[str, Any]:
    """The ``method`` of the registry matrix's job for ``name``: its defaults, made small for an
    augmentation method, then METHOD_OVERRIDES."""
    entry = registry.get(name)
    small: dict[str, Any] = {}
    if entry.method_cls.needs.models:
        fields = entry.method_cls.config_cls.model_fields
        small = {k: v for k, v in SMALL_AUGMENTATION.items() if k in fields}
    return {"name": name, **small, **METHOD_OVERRIDES.get(name, {})}


def matrix_training(name: str) -> dict[str, Any]:
    """The ``training`` of the registry matrix's job for ``name``: small, capped at 2 steps a
    stage, without the settings whose values the method's recipe sets itself (the API refuses
    them: see kd_engine.plan)."""
    training = {**SMALL_TRAINING, "epochs": 2, "max_steps": 2}
    if issubclass(registry.get(name).method_cls, ChainMethod):
        return training  # every hop of a chain is a one-stage method
    spec = JobSpec.model_validate(
        {"teacher": "t", "method": matrix_method(name), "dataset": SMALL_DATA, "training": training}
    )
    unused = overridden_training_fields(spec, plan_job(spec))
    return {k: v for k, v in training.items() if f"training.{k}" not in unused}


@pytest.mark.parametrize("method", registry.names())
def test_every_registered_method_runs_through_the_worker(
    client: Client, teacher: dict[str, Any], method: str
) -> None:
    """The registry matrix: each method's defaults run a few real steps to a stored student."""
    job = client.submit(
        {
            "teacher": f"job:{teacher['id']}",
            # born_again's generations have the teacher's architecture: a full copy
            "student": {} if method == "born_again" else {"num_layers": 2},
            "method": matrix_method(method),
            "dataset": SMALL_DATA,
            # max_steps caps every stage of a multi-stage method
            "training": matrix_training(method),
            # The export is the same for every method's student: checked once, in
            # test_finetune_then_vanilla_kd_downloads_a_student_that_loads (and per student
            # type in tests/unit/test_text_students.py); off here to keep the matrix short.
            "export": NO_EXTRAS,
        }
    )
    phases: set[str] = set()
    done = client.wait(
        job["id"],
        timeout_s=600,
        poll_s=0.2,
        on_update=lambda j: phases.add((j["progress"] or {}).get("phase", "")),
    )
    assert done["status"] == "succeeded", done["error"]
    names = {a["name"] for a in client.artifacts(job["id"])["items"]}
    assert {"config.json", "model.safetensors", "metrics.json"} <= names
    final = client.metrics(job["id"])["final"]
    assert final["method"] == method
    check_classification_metrics(final, SMALL_DATA["max_eval_examples"])
    # The smoke cap (max_steps) cuts every stage short: one warning per stage says so.
    # universal_kd fits its teacher probes in a stage of their own: no schedule warning. Only
    # annealing_kd also warns that the cap stops its temperature before T = 1.
    stages = final["stages"]
    cut = [w for w in final["warnings"] if "cut stage" in w]
    assert len(cut) == len(stages), final["warnings"]
    others = [w for w in final["warnings"] if w not in cut]
    if method == "annealing_kd":
        assert len(others) == 1 and "training.max_steps" in others[0]
    else:
        assert others == []
    # Each stage of the method ran its (capped) steps and is reported; the final progress
    # keeps the job's last step.
    assert stages and all(st["steps"] == 2 for st in stages)
    assert done["progress"]["step"] == 2 * len(stages) == done["progress"]["total_steps"]
    assert phases <= {"", "generator", "student"}, phases

    method_cls = registry.get(method).method_cls
    if not method_cls.needs.models:
        assert "augmented_samples.jsonl" not in names
        assert "generator" not in phases
        return
    # An augmentation method keeps decoded (original, augmented) pairs as an artifact.
    assert "augmented_samples.jsonl" in names
    r = client.http.get(f"/v1/jobs/{job['id']}/artifacts/augmented_samples.jsonl")
    assert r.status_code == 200
    samples = [json.loads(line) for line in r.text.splitlines()]
    assert samples
    for sample in samples:
        assert isinstance(sample["original"], str) and sample["original"]
        assert isinstance(sample["augmented"], str) and sample["augmented"]
    if "generator" not in method_cls.config_cls.model_fields:
        return
    # The MATE-KD family: the generator's max steps ran (before the first student step of the
    # adversarial stage) and were logged with the divergence they reached; masked tokens were
    # rewritten by its samples.
    train_log = client.http.get(f"/v1/jobs/{job['id']}/artifacts/train_log.jsonl").text
    records = [json.loads(line) for line in train_log.splitlines()]
    generator = [r for r in records if r.get("event") == "generator"]
    assert generator, "no generator (max) steps in the train log"
    for r in generator:  # the divergence reached (mate_kd: generator_kl on a classifier)
        reached = {k: v for k, v in r.items() if k.startswith("generator_")}
        assert reached and all(math.isfinite(v) and v >= 0.0 for v in reached.values()), r
    if method == "mate_kd":
        assert all("generator_kl" in r for r in generator)
    assert all(r["steps"] == SMALL_AUGMENTATION["generator_steps"] for r in generator)
    assert any(s["original"] != s["augmented"] for s in samples)


def test_an_augmentation_job_that_cannot_fit_fails_before_training(
    client: Client, teacher: dict[str, Any], stack: Stack
) -> None:
    """The API refuses it at submit (kd_engine.memory against the queue's budget); one that
    gets past the API anyway (queued directly here, as a job stored before the check was)
    meets the worker's memory check (kd_engine.augment.memory): (B, T, V) float32 generator
    tensors alone at B 4096, T 512, V 30522 are 3 * 4096 * 512 * 30522 * 4 bytes (~715 GiB),
    more than any worker has; the job fails when the method binds its models, naming the
    setting, before a single training step."""
    spec = {
        "teacher": f"job:{teacher['id']}",
        "student": {"num_layers": 2},
        "method": matrix_method("mate_kd"),
        "dataset": SMALL_DATA,
        "training": {**SMALL_TRAINING, "batch_size": 4096, "max_seq_length": 512},
    }
    refused = client.http.post("/v1/jobs", json=spec)
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "training.batch_size"
    assert "limit 16.0 GiB of queue cpu" in refused.json()["error"]["message"]
    job = queue_directly(stack, spec)
    done = client.wait(job["id"], timeout_s=300)
    assert done["status"] == "failed"
    assert done["error"].startswith("training.batch_size: mate_kd needs about "), done["error"]
    assert "GiB" in done["error"] and "Traceback" not in done["error"]
    assert (done["progress"] or {}).get("step", 0) == 0
    assert client.artifacts(job["id"])["items"] == []


def test_a_cnn_student_through_the_worker_loads_after_download(
    client: Client, teacher: dict[str, Any], tmp_path: Path
) -> None:
    import kd_engine.models  # noqa: F401  (registers the BiLSTM/CNN model types)

    job = client.submit(
        {
            "teacher": f"job:{teacher['id']}",
            "student": {"type": "cnn"},
            "method": {"name": "universal_kd"},
            "dataset": SMALL_DATA,
            # max_steps caps every stage of a multi-stage method
            "training": {**SMALL_TRAINING, "epochs": 2, "max_steps": 2},
            "export": {**NO_EXTRAS, "onnx": True},  # a CNN student's ONNX: checked below
        }
    )
    done = client.wait(job["id"], timeout_s=600)
    assert done["status"] == "succeeded", done["error"]
    model = AutoModelForSequenceClassification.from_pretrained(
        client.download_archive(job["id"], tmp_path)
    )
    assert model.config.model_type == "distillery-kim-cnn"
    # A CNN student is exported to ONNX too.
    assert (tmp_path / job["id"] / "model.onnx").is_file()
    assert client.metrics(job["id"])["final"]["onnx"]["max_abs_diff_logits"] < 1e-4
    tok = AutoTokenizer.from_pretrained(tmp_path / job["id"])
    with torch.inference_mode():
        logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)


def test_uploaded_teacher_and_csv_distil_over_real_http(client: Client, tmp_path: Path) -> None:
    """A team's own teacher (a 1-layer MiniLM classifier saved as safetensors, tar.gz) and CSV
    (with a BOM) uploaded with POST /v1/files, named as file-<id> in a job, distilled by the
    worker; the student downloads and loads."""
    labels = ["neg", "pos"]
    wheel = builtin_model_path("minilm-l6")
    teacher_dir = tmp_path / "teacher"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(
        wheel,
        num_hidden_layers=1,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    ).save_pretrained(teacher_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(wheel).save_pretrained(teacher_dir)
    archive = tmp_path / "teacher.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(teacher_dir, arcname="teacher")
    csv_path = tmp_path / "reviews.csv"
    lines = ["text,label"] + [
        f"review {i} was {'awful' if i % 2 else 'great'},{labels[(i + 1) % 2]}" for i in range(48)
    ]
    csv_path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())

    model = client.upload(archive, "model")
    assert model["report"]["label_names"] == labels
    data = client.upload(csv_path, "dataset")
    assert data["report"]["encoding"] == "utf-8-sig"
    assert data["report"]["labels"] == {"neg": 24, "pos": 24}
    assert {f["id"] for f in client.files()} >= {model["id"], data["id"]}

    job = client.submit(
        {
            "teacher": model["id"],
            "student": {"num_layers": 1},
            "method": {"name": "vanilla_kd"},
            "dataset": {"source": data["id"]},
            "training": SMALL_TRAINING,
            "export": NO_EXTRAS,
        }
    )
    done = client.wait(job["id"], timeout_s=600)
    assert done["status"] == "succeeded", done["error"]
    split = client.http.get(f"/v1/jobs/{job['id']}/artifacts/split.json").json()
    assert split["splits"]["test"]["source"] == data["id"]
    student_dir = client.download_archive(job["id"], tmp_path / "student")
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 1
    assert student.config.id2label == dict(enumerate(labels))
    # the job has finished: its files may go
    client.delete_file(data["id"])
    assert data["id"] not in {f["id"] for f in client.files()}
