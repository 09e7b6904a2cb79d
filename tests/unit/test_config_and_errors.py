"""Settings parsing and the error tree, without I/O."""

from __future__ import annotations

import pytest

from agentchat import errors
from agentchat.config import ConfigError, load_settings
from agentchat.core.ratelimit import TokenBucket


def test_defaults_are_the_embedded_ones() -> None:
    settings = load_settings(env={})
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert (settings.bus, settings.store, settings.payments) == ("memory://", "file://./data", "dev://")


def test_environment_then_flags() -> None:
    env = {"AGENTCHAT_PORT": "9000", "AGENTCHAT_BUS": "redis://127.0.0.1:6379/0", "AGENTCHAT_MAX_FRAME_BYTES": "1000",
           "PATH": "/usr/bin"}
    settings = load_settings(env=env, port=9100)
    assert settings.port == 9100
    assert settings.bus == "redis://127.0.0.1:6379/0"
    assert settings.limits.max_frame_bytes == 1000


@pytest.mark.parametrize("env, words", [
    ({"AGENTCHAT_PORT": "eighty"}, "whole number"),
    ({"AGENTCHAT_BUSS": "memory://"}, "unknown setting"),
    ({"AGENTCHAT_BUS": "kafka://x"}, "bus"),
    ({"AGENTCHAT_STORE": "gs://bucket"}, "store"),
    ({"AGENTCHAT_PAYMENTS": "paypal://"}, "payments"),
])
def test_bad_settings_are_refused_with_a_sentence(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(env=env)


def test_every_code_builds_the_right_class() -> None:
    for code, (cls, sentence) in errors.CODES.items():
        err = errors.error(code)
        assert type(err) is cls and err.message == sentence and err.code == code
        assert err.to_wire() == {"code": code, "message": sentence, "retryable": cls.retryable}
    with pytest.raises(ValueError):
        errors.InvalidInput("no_such_code", "x")


def test_token_bucket_refills_with_time() -> None:
    bucket = TokenBucket(rate=2, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0)
    assert not bucket.take(0.1)
    assert bucket.take(0.6)


def test_urls_are_redacted_for_logs() -> None:
    from agentchat.config import redact_url

    assert redact_url("s3://b?endpoint=http://h:9&access_key=AK&secret_key=SK") == \
        "s3://b?endpoint=http://h:9&access_key=***&secret_key=***"
    assert redact_url("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("memory://") == "memory://"
