"""Which settings are secret is said once, on the field's type (``shared.settings.Secret``)."""

from __future__ import annotations

import pytest

from shared.settings import (
    SECRET_KEYS,
    SECRET_MAPPINGS,
    SigningSecret,
    secret_values,
    settings_fields,
    settings_from_dict,
)

SECRET_WORDS = ("password", "token", "secret", "headers")


def test_every_field_named_like_a_secret_is_marked_secret() -> None:
    """A settings field whose name says it holds a credential is marked ``Secret`` (so masked
    and redacted everywhere); adding one without the mark fails here."""
    named = {n for n, _ in settings_fields() if any(w in n for w in SECRET_WORDS) and n != "proxy_headers"}
    assert named == SECRET_KEYS | SECRET_MAPPINGS


def test_secret_values_finds_each_kind_of_secret() -> None:
    """Every secret a configuration holds is found: marked fields, header values (and the
    credential after ``Bearer``), a signing secret's bare key, URL and DSN passwords."""
    settings = settings_from_dict(
        {
            "redis": {"url": "redis://:redis-pass-1@127.0.0.1:6379/0"},
            "receiver": {"basic_auth_user": "synap", "basic_auth_password": "basic-pass-1"},
            "admin_token": "admin-token-0123456789",
            "integrations": [
                {
                    "name": "lms",
                    "type": "http",
                    "url": "https://u:url-pass-1@lms.example/hook",
                    "headers": {"Authorization": "Bearer header-cred-1"},
                    "signing_secret": "whsec_c2VjcmV0LWtleS0x",
                },
                {"name": "db", "type": "postgres", "dsn": "postgresql://p:dsn-pass-1@127.0.0.1/x"},
            ],
        }
    )
    assert secret_values(settings) >= {
        "redis-pass-1",
        "basic-pass-1",
        "admin-token-0123456789",
        "url-pass-1",
        "Bearer header-cred-1",
        "header-cred-1",
        "whsec_c2VjcmV0LWtleS0x",
        "c2VjcmV0LWtleS0x",
        "dsn-pass-1",
    }


@pytest.mark.parametrize("text", ["c2VjcmV0", "whsec_", "whsec_not base64!"])
def test_a_signing_secret_that_is_not_whsec_base64_is_refused(text: str) -> None:
    """``SigningSecret`` parses ``whsec_`` + non-empty base64 once, and refuses anything else."""
    with pytest.raises(ValueError, match="whsec_"):
        SigningSecret(text)
    assert SigningSecret("whsec_c2VjcmV0").key == b"secret"
