"""The typed contracts (kd_engine.contracts): ``metrics.json`` read from a file written before the
model existed, unknown keys kept, bad values refused by field, and the SDK's copies equal to the
engine's definitions (the SDK installs without the server, so it cannot import them)."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel, ValidationError
from pydantic.dataclasses import is_pydantic_dataclass
from pydantic.fields import FieldInfo

from distillery_sdk import contracts as sdk_contracts
from distillery_sdk import models as sdk_models
from kd_engine import contracts
from kd_engine.contracts import JobMetrics, Progress, load_metrics, unmodelled_keys
from kd_engine.report_html import render_report

OLD_FILE = Path(__file__).parent.parent / "fixtures" / "metrics_v1_born_again.json"
"""metrics.json of a real born_again job (2 generations, int8 export) written before
``schema_version`` and the model existed (kd_engine at d7c01c7)."""


def old_metrics() -> dict[str, Any]:
    data = json.loads(OLD_FILE.read_text())
    assert isinstance(data, dict)
    return data


def test_a_metrics_json_from_before_the_model_loads_as_version_1() -> None:
    raw = old_metrics()
    assert "schema_version" not in raw
    m = load_metrics(raw)
    assert m.schema_version == 1
    assert unmodelled_keys(m) == []  # every key it holds is a field of the model
    assert m.to_json() == raw  # nothing added, dropped or changed
    assert m.method == "born_again" and m.task == "classification" and not m.regression
    assert m.ensemble is not None and m.ensemble.members == ["generation_1", "generation_2"]
    assert [h.name for h in m.hops] == ["generation_1", "generation_2"]
    assert m.hops[0].artifact == "generation_1.tar.gz" and m.hops[1].artifact is None
    assert m.hops[1].teacher == "generation_1"
    assert m.onnx is not None and m.onnx.int8 is not None
    assert m.onnx.int8.file == "model.int8.onnx" and m.onnx.opset == 17
    assert m.latency is not None
    speedup = m.latency.figure("speedup", "batch1")
    assert speedup is not None and speedup.median == raw["latency"]["batch1"]["speedup"]["median"]
    assert m.latency.figure("speedup", "batch7") is None
    assert m.confusion_matrix is not None and m.confusion_matrix.labels == ["rotten", "fresh"]
    assert m.student is not None and m.student.bytes == raw["student"]["bytes"]


def test_unknown_keys_are_kept_and_do_not_break_a_reader() -> None:
    """A newer writer's block (top level and nested) is kept, given back, and the report of
    this (older) reader still renders."""
    raw = old_metrics()
    raw["schema_version"] = 99
    raw["carbon"] = {"grams": 1.5}
    raw["student"]["flops"] = 123
    raw["hops"][0]["new_field"] = [1, 2]
    m = load_metrics(raw)
    assert sorted(unmodelled_keys(m)) == ["carbon", "hops[0].new_field", "student.flops"]
    assert m.to_json() == raw
    assert m.model_extra == {"carbon": {"grams": 1.5}}
    assert "born_again" in render_report(m)


def test_a_running_jobs_partial_metrics_and_none_load() -> None:
    running = load_metrics({"epochs": [{"stage": "train", "step": 3, "dev": {"accuracy": 0.5}}]})
    assert running.test is None and running.epochs[0].dev == {"accuracy": 0.5}
    assert running.to_json() == {
        "epochs": [{"stage": "train", "step": 3, "dev": {"accuracy": 0.5}}]
    }
    assert load_metrics(None).to_json() == {}
    assert load_metrics(running) is running


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"test": {"accuracy": "high"}}, ("test", "accuracy")),
        ({"task": "translation"}, ("task",)),
        ({"student": {"parameters": "many"}}, ("student", "parameters")),
        ({"epochs": [{"step": "three"}]}, ("epochs", 0, "step")),
    ],
)
def test_a_wrong_value_is_refused_naming_its_key(
    patch: dict[str, Any], where: tuple[str | int, ...]
) -> None:
    with pytest.raises(ValidationError) as caught:
        load_metrics({**old_metrics(), **patch})
    assert [e["loc"] for e in caught.value.errors()] == [where]


def test_progress_is_a_typed_record() -> None:
    p = Progress("train", 1, 5, 10, {"loss": 1}, stage_step=5, hop=2, num_hops=3)
    assert p.losses == {"loss": 1.0} and isinstance(p.losses["loss"], float)
    assert dataclasses.replace(p, stage="x").stage == "x" and p.stage == "train"
    stored = dataclasses.asdict(p)
    assert Progress(**stored) == p
    assert Progress(**{**stored, "from_a_newer_worker": 1}) == p  # unknown keys ignored
    with pytest.raises(ValidationError):
        Progress("train", "one", 5, 10, {})  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.step = 6  # type: ignore[misc]


# --- the SDK's copies: same fields, same types, same defaults ---------------------------------


def _fields(cls: type) -> dict[str, FieldInfo]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return dict(cls.model_fields)
    assert is_pydantic_dataclass(cls), cls
    return dict(cls.__pydantic_fields__)


def _is_contract(t: object) -> bool:
    return isinstance(t, type) and (issubclass(t, BaseModel) or is_pydantic_dataclass(t))


def _shape(t: object) -> object:
    """A comparable form of a type: a contract class by its name, fields and ``extra``
    handling (recursively); a generic by its origin and arguments."""
    if _is_contract(t):
        assert isinstance(t, type)
        extra = t.model_config.get("extra") if issubclass(t, BaseModel) else None
        return (t.__name__, extra, _field_shapes(t))
    origin = get_origin(t)
    if origin is None:
        return t
    if origin is Union:
        origin = types.UnionType
    return (origin, tuple(_shape(a) for a in get_args(t)))


def _field_shapes(cls: type) -> dict[str, object]:
    return {
        name: (
            _shape(f.annotation),
            f.is_required(),
            None if f.is_required() else f.get_default(call_default_factory=True),
        )
        for name, f in _fields(cls).items()
    }


@pytest.mark.parametrize(
    ("sdk", "engine"),
    [
        (sdk_models.Progress, contracts.Progress),
        (sdk_contracts.JobMetrics, contracts.JobMetrics),
        (sdk_contracts.EvaluationRecord, contracts.EvaluationRecord),
    ],
)
def test_the_sdk_copies_match_the_engine_definitions(sdk: type, engine: type) -> None:
    assert _field_shapes(sdk) == _field_shapes(engine)


def test_the_shape_comparison_sees_a_drift() -> None:
    """The comparison above would fail on a renamed field, a changed type or default."""

    class A(BaseModel):
        x: int | None = None
        y: list[str] = []

    class B(BaseModel):
        x: float | None = None
        y: list[str] = []

    class C(BaseModel):
        x: int | None = 0
        y: list[str] = []

    class D(BaseModel):
        x: Literal["a"] | None = None

    assert _field_shapes(A) != _field_shapes(B)
    assert _field_shapes(A) != _field_shapes(C)
    assert _field_shapes(A) != _field_shapes(D)
    assert _shape(sdk_contracts.JobMetrics) != _shape(sdk_models.Metrics)


def test_every_engine_block_has_an_sdk_copy() -> None:
    engine = {
        n
        for n, v in vars(contracts).items()
        if isinstance(v, type) and issubclass(v, contracts.Block)
    }
    sdk = {
        n
        for n, v in vars(sdk_contracts).items()
        if isinstance(v, type) and issubclass(v, sdk_contracts.Block)
    }
    assert engine == sdk
    for name in engine:
        assert _shape(getattr(sdk_contracts, name)) == _shape(getattr(contracts, name)), name


def test_the_sdk_reads_a_servers_metrics_json() -> None:
    raw = {k: v for k, v in old_metrics().items() if k != "epochs"}
    final = sdk_contracts.JobMetrics.model_validate(raw)
    assert final.model_dump(mode="json", exclude_unset=True) == raw
    assert final.teacher is not None and final.teacher.parameters == raw["teacher"]["parameters"]


def test_metrics_model_has_no_torch() -> None:
    """The contracts package is light (pure pydantic): the API imports it and the SDK copies
    it; it imports nothing of torch, the engine's other modules, api or worker."""
    light = ("__future__", "collections", "dataclasses", "typing", "pydantic", "kd_engine")
    for path in Path(contracts.__file__).parent.glob("*.py"):
        lines = path.read_text().splitlines()
        imports = [line.split()[1] for line in lines if line.startswith(("import ", "from "))]
        assert all(name.split(".")[0] in light for name in imports), (path, imports)
        engine = [name for name in imports if name.startswith("kd_engine")]
        assert all(name.startswith("kd_engine.contracts") for name in engine), (path, engine)
    assert isinstance(JobMetrics.model_json_schema(), dict)


def test_event_payloads_are_typed_and_the_sdk_reads_them_alike() -> None:
    assert {k: v.__name__ for k, v in contracts.EVENT_PAYLOADS.items()} == {
        k: v.__name__ for k, v in sdk_contracts.EVENT_PAYLOADS.items()
    }
    data = {
        "name": "step-00000004",
        "step": 4,
        "total_steps": 9,
        "hop": 1,
        "num_hops": 1,
        "stage": "train",
        "reason": "interval",
        "size_bytes": 1234,
    }
    saved = contracts.event_payload("checkpoint", data)
    assert isinstance(saved, contracts.CheckpointSaved) and saved.model_dump() == data
    assert contracts.event_payload("stage", {"stage": "prepare"}) is None
    event = sdk_models.Event(
        id=1, time="2026-01-01T00:00:00Z", level="info", type="checkpoint", message="", data=data
    )
    assert isinstance(event.payload, sdk_contracts.CheckpointSaved)
    assert event.payload.size_bytes == 1234
    epoch = sdk_models.Event(
        id=2, time="t", level="info", type="epoch", message="", data={"step": 3, "dev": {"f": 1}}
    )
    assert isinstance(epoch.payload, sdk_contracts.EvaluationRecord) and epoch.payload.step == 3
    with pytest.raises(ValidationError):
        contracts.event_payload("succeeded", {"test": {"accuracy": "high"}})


def test_a_checkpoint_manifest_keeps_its_loop_state_exactly() -> None:
    """The manifest model passes the loop's sums through untouched (a resume is bit-exact)."""
    sums = {"loss": 0.1 + 0.2, "kd": 1e-300}
    m = contracts.CheckpointManifest(
        format=1,
        spec_hash="abc",
        name="step-00000002",
        step=2,
        total_steps=4,
        hop=1,
        num_hops=1,
        stage="train",
        stage_index=1,
        reason="pause",
        dev={},
        time=1.5,
        teacher_taught=False,
        loop={"sums": sums, "step": 2, "stage_best": {}},
        finished=[],
    )
    back = contracts.CheckpointManifest.model_validate(json.loads(json.dumps(m.model_dump())))
    assert back == m and back.loop["sums"] == sums
    info = contracts.CheckpointInfo.model_validate(m.model_dump())  # what a listing reads
    assert info.name == "step-00000002" and not hasattr(info, "loop")
    assert set(m.model_dump()) == {*contracts.CheckpointInfo.model_fields, "spec_hash", "time",
                                   "teacher_taught", "loop", "finished"}  # fmt: skip
    with pytest.raises(ValidationError):
        contracts.CheckpointManifest.model_validate({**m.model_dump(), "step": "two"})
