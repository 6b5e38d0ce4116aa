"""A file:// dataset is read at submit: a bad file is a 422 naming the field, the file and the
line, and nothing is stored or queued (real PostgreSQL and Redis, the app over TestClient)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from api.main import create_app
from core.db import Job
from core.settings import Settings

FINETUNE: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "file://tweets.csv"},
}
CLASSIFIER = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "num_hidden_layers": 6,
    "hidden_size": 384,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "vocab_size": 30522,
    "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
}


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    """The app, with a key of tenant ``test``; every request of these tests goes through it."""
    with TestClient(create_app(settings), headers=key_headers) as c:
        yield c


def write_tweets(settings: Settings, name: str = "tweets.csv", bom: bool = False) -> None:
    """30 rows, 3 classes: negative, neutral, positive."""
    labels = ["negative", "neutral", "positive"]
    body = "text,sentiment\n" + "".join(f"tweet {i},{labels[i % 3]}\n" for i in range(30))
    (settings.data_root / name).write_text(("\ufeff" if bom else "") + body, encoding="utf-8")


def teacher(settings: Settings, id2label: dict[str, str]) -> str:
    path = settings.models_root / "teacher"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**CLASSIFIER, "id2label": id2label}))
    return "file://teacher"


def nothing_stored_or_queued(settings: Settings) -> bool:
    with Session(create_engine(settings.database_url)) as s:
        jobs = int(s.scalar(select(func.count()).select_from(Job)) or 0)
    return jobs == 0 and redis.Redis.from_url(settings.broker_url).llen(settings.queue) == 0


def post(client: TestClient, **dataset: Any) -> Any:
    return client.post("/v1/jobs", json={**FINETUNE, "dataset": dataset})


def test_a_csv_with_a_bom_is_accepted(client: TestClient, settings: Settings) -> None:
    write_tweets(settings, bom=True)
    r = post(client, source="file://tweets.csv", label_column="sentiment")
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"


def test_a_label_column_typo_is_422_listing_the_columns(
    client: TestClient, settings: Settings
) -> None:
    write_tweets(settings)
    r = post(client, source="file://tweets.csv", label_column="sentimnet")
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "dataset.label_column"
    assert err["message"] == (
        "tweets.csv has no column 'sentimnet' (did you mean 'sentiment'?); "
        "its columns are 'text', 'sentiment'"
    )
    assert nothing_stored_or_queued(settings)


def test_a_non_utf8_file_is_422_naming_the_file_and_line(
    client: TestClient, settings: Settings
) -> None:
    rows = "".join(f"tweet {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))
    data = ("text,label\n" + rows + "crème brûlée,pos\n").encode("cp1252")
    (settings.data_root / "sub").mkdir()
    (settings.data_root / "sub" / "news.csv").write_bytes(data)
    r = post(client, source="file://sub/news.csv")
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "dataset.source"
    assert err["message"] == (
        "sub/news.csv: line 22 is not UTF-8 (byte 0xe8 at column 3); save the file as UTF-8"
    )
    assert nothing_stored_or_queued(settings)


def test_a_teacher_with_other_labels_is_422_naming_the_source(
    client: TestClient, settings: Settings
) -> None:
    write_tweets(settings)
    ref = teacher(settings, {"0": "rotten", "1": "fresh"})
    body = {
        **FINETUNE,
        "teacher": ref,
        "method": {"name": "vanilla_kd"},
        "dataset": {"source": "file://tweets.csv", "label_column": "sentiment"},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "dataset.source"
    assert "the teacher's labels ['rotten', 'fresh'] do not match" in err["message"]
    assert (
        "the dataset has labels the teacher lacks: ['negative', 'neutral', 'positive']"
        in (err["message"])
    )
    assert nothing_stored_or_queued(settings)


def test_a_teacher_with_the_same_labels_in_another_order_is_accepted(
    client: TestClient, settings: Settings
) -> None:
    write_tweets(settings)
    ref = teacher(settings, {"0": "positive", "1": "negative", "2": "neutral"})
    body = {
        **FINETUNE,
        "teacher": ref,
        "method": {"name": "vanilla_kd"},
        "dataset": {"source": "file://tweets.csv", "label_column": "sentiment"},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("files", "dataset", "field", "words"),
    [
        (
            {"ood.jsonl": '{"text": "a", "label": "positive"}\n{"text": "b", oops\n'},
            {"eval_sets": [{"name": "ood", "source": "file://ood.jsonl"}]},
            "dataset.eval_sets.0.source",
            "ood.jsonl: line 2 is not valid JSON",
        ),
        (
            {"ood.csv": "text,stars\nok,5\n"},
            {"eval_sets": [{"name": "ood", "source": "file://ood.csv", "label_column": "star"}]},
            "dataset.eval_sets.0.label_column",
            "did you mean 'stars'?",
        ),
        (
            {"ood.csv": "text,label\nok,mixed\n"},
            {"eval_sets": [{"name": "ood", "source": "file://ood.csv"}]},
            "dataset.eval_sets.0.label_column",
            "labels ['mixed'] are not the job's labels",
        ),
        (
            {"test.csv": "text,label\nok,sarcastic\n"},
            {"test_source": "file://test.csv"},
            "dataset.test_source",
            "labels the training file does not have: ['sarcastic']",
        ),
        (
            {"tiny.csv": "text,label\na,x\nb,y\nc,x\n"},
            {"source": "file://tiny.csv"},
            "dataset.source",
            "tiny.csv has 3 rows, too few to hold out 10%",
        ),
        (
            {"gap.csv": "text,label\na,x\n,y\n"},
            {"source": "file://gap.csv"},
            "dataset.source",
            "gap.csv: line 3 has no value in column 'text'",
        ),
    ],
)
def test_other_bad_files_are_422_naming_the_field(
    client: TestClient,
    settings: Settings,
    files: dict[str, str],
    dataset: dict[str, Any],
    field: str,
    words: str,
) -> None:
    write_tweets(settings, "train.csv")
    (settings.data_root / "train.csv").write_text(
        (settings.data_root / "train.csv").read_text().replace("sentiment", "label")
    )
    for name, text in files.items():
        (settings.data_root / name).write_text(text, encoding="utf-8")
    r = post(client, **{"source": "file://train.csv", **dataset})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert words in err["message"], err
    assert nothing_stored_or_queued(settings)


def test_a_corpus_without_its_column_is_422(client: TestClient, settings: Settings) -> None:
    write_tweets(settings)
    (settings.data_root / "plots.csv").write_text("sentence\nA plot.\n", encoding="utf-8")
    body = {
        **FINETUNE,
        "teacher": teacher(settings, {"0": "negative", "1": "neutral", "2": "positive"}),
        "method": {"name": "minimax_knn", "corpus": "file://plots.csv"},
        "dataset": {"source": "file://tweets.csv", "label_column": "sentiment"},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "method.corpus_text_column"
    assert "plots.csv has no column 'text'" in err["message"]
    body["method"] = {**body["method"], "corpus_text_column": "sentence"}
    assert client.post("/v1/jobs", json=body).status_code == 201


def test_only_a_prefix_of_a_long_file_is_read_at_submit(
    settings: Settings, tmp_path: Path, key_headers: dict[str, str]
) -> None:
    """Above ``dataset_check_rows`` rows the file is checked on its prefix (the worker reads
    it whole); a problem inside the prefix is still a 422."""
    short = settings.model_copy(update={"dataset_check_rows": 25})
    rows = "".join(f"tweet {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    data = ("text,label\n" + rows).encode() + b"caf\xe9,pos\n"
    (settings.data_root / "long.csv").write_bytes(data)
    (settings.data_root / "early.csv").write_bytes(b"text,label\ncaf\xe9,pos\n" + rows.encode())
    with TestClient(create_app(short), headers=key_headers) as c:
        assert post(c, source="file://long.csv").status_code == 201
        r = post(c, source="file://early.csv")
    assert r.status_code == 422
    assert "early.csv: line 2 is not UTF-8" in r.json()["error"]["message"]
