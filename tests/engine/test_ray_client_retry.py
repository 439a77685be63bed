"""A ray:// driver asks the Ray Client server again when it fails to start a session.

The failure ("Initialization failure from server") comes from the cluster's side on a busy head
and cannot be provoked on demand, so ray.init is replaced here by one that fails as Ray's client
does (engine/actors.py's other paths meet a real cluster in tests/integration).
"""

from __future__ import annotations

import logging

import pytest
import ray

from leukoflow.engine import actors
from leukoflow.errors import LeukoflowError

REFUSAL = "Initialization failure from server:\nRuntimeError: Starting Ray client server failed."


@pytest.fixture
def ray_init(monkeypatch):
    """ray.init that fails as a busy Ray Client server does, `failures` times, then connects."""
    calls: list[str] = []
    state = {"failures": 0}

    def fake_init(address, **kwargs):
        calls.append(address)
        if len(calls) <= state["failures"]:
            raise ConnectionAbortedError(REFUSAL)

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(actors, "CLIENT_RETRY_PAUSE_S", 0.0)
    return calls, state


def test_a_failed_client_session_start_is_asked_again(ray_init, caplog):
    calls, state = ray_init
    state["failures"] = actors.CLIENT_SESSION_ATTEMPTS - 1
    with caplog.at_level(logging.WARNING, logger="leukoflow.extract"):
        actors._join_cluster("ray://head:10001", runtime_env={})
    assert calls == ["ray://head:10001"] * actors.CLIENT_SESSION_ATTEMPTS
    warnings = [
        r.getMessage() for r in caplog.records if "could not start a session" in r.getMessage()
    ]
    assert len(warnings) == actors.CLIENT_SESSION_ATTEMPTS - 1
    assert "attempt 1 of 3" in warnings[0]


def test_a_client_server_that_keeps_failing_is_one_clear_error(ray_init):
    calls, state = ray_init
    state["failures"] = 99
    with pytest.raises(LeukoflowError) as refused:
        actors._join_cluster("ray://head:10001", runtime_env={})
    assert len(calls) == actors.CLIENT_SESSION_ATTEMPTS
    message = str(refused.value)
    assert "could not start a session" in message and "ray_client_server_" in message
    assert "RAY_AUTH_TOKEN" not in message  # not the token hint: the token was accepted


def test_a_gcs_address_is_not_retried(ray_init):
    """HOST:PORT joins the cluster directly; there is no client server to ask again."""
    calls, state = ray_init
    state["failures"] = 1
    with pytest.raises(LeukoflowError, match="RAY_AUTH_TOKEN"):
        actors._join_cluster("10.0.0.5:6379", runtime_env={})
    assert calls == ["10.0.0.5:6379"]
