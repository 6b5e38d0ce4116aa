"""Webhook signing: the headers of a delivery against the Standard Webhooks specification's
published test vector, and verified as a receiver does (``standardwebhooks.Webhook.verify``)."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from core.webhooks import new_secret, signed_headers

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = '{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signed_headers_reproduce_the_specification_test_vector() -> None:
    headers = signed_headers(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY)
    assert headers == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TS),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    # the prefix is optional
    sig = signed_headers(VECTOR_SECRET[6:], VECTOR_ID, VECTOR_TS, VECTOR_BODY)["webhook-signature"]
    assert sig == VECTOR_SIGNATURE
    for other in (
        signed_headers(VECTOR_SECRET, VECTOR_ID, VECTOR_TS + 1, VECTOR_BODY),
        signed_headers(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY + " "),
        signed_headers(VECTOR_SECRET, VECTOR_ID + "x", VECTOR_TS, VECTOR_BODY),
    ):
        assert other["webhook-signature"] != VECTOR_SIGNATURE


def test_a_receiver_verifies_the_headers_and_refuses_a_changed_body_or_old_timestamp() -> None:
    secret = new_secret()
    body = '{"type":"job.succeeded","data":{"job_id":"j1"}}'
    now = int(time.time())
    headers = signed_headers(secret, "msg_1", now, body)
    assert Webhook(secret).verify(body.encode(), headers) == {
        "type": "job.succeeded",
        "data": {"job_id": "j1"},
    }
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(secret).verify(body.replace("j1", "j2").encode(), headers)
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(new_secret()).verify(body.encode(), headers)
    old = signed_headers(secret, "msg_1", now - 600, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(body.encode(), old)


def test_new_secrets_are_32_random_bytes_in_whsec_format() -> None:
    a, b = new_secret(), new_secret()
    assert a.startswith("whsec_") and a != b
    key = base64.b64decode(a.removeprefix("whsec_"), validate=True)
    assert len(key) == 32
    assert base64.b64encode(key).decode() == a[6:]
