"""Loaded by every Python process the test suite starts (``tests/conftest.py`` puts this
directory on ``PYTHONPATH``): in an ``examhook`` process (``python -m cli.main ...`` or the
``examhook`` script) it keeps a transcript of what the process prints, for the suite's leak
check (``tests/leakcheck.py``).

* ``sys.stdout`` and ``sys.stderr`` become tees: everything written goes where it went before
  and, line-buffered and flushed at once (a SIGKILL loses nothing), to
  ``$PYTEST_EXAMHOOK_TRANSCRIPTS/<pid>-<token>.stdout`` / ``.stderr``; the command line goes
  to ``.argv.json``. Logging, click and tracebacks all write through ``sys.stdout`` /
  ``sys.stderr``, so this is everything the process prints.
* The secrets of every configuration the process loads (``shared.settings.settings_from_dict``,
  which ``load_settings`` calls) go to ``.secrets.json``: the leak check looks for them.

Nothing happens without ``PYTEST_EXAMHOOK_TRANSCRIPTS`` or in any other program.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

TRANSCRIPTS_ENV = "PYTEST_EXAMHOOK_TRANSCRIPTS"
MIN_SECRET_LENGTH = 4  # as ingest/admin/redact.py: shorter ones would match ordinary text


def is_examhook(argv: list[str]) -> bool:
    """``python -m cli.main ...`` or ``.../examhook ...``."""
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] == "cli.main":
        return True
    return len(argv) >= 2 and os.path.basename(argv[1]) == "examhook"


def settings_secrets(settings: Any) -> tuple[list[str], list[str]]:
    """(The secrets of a ``Settings``, the email addresses it configures). The secrets are
    those ``ingest/admin/redact.secrets_of`` hides, plus percent-decoded URL passwords."""

    def url_password(url: str | None) -> list[str | None]:
        try:
            password = urlsplit(url or "").password
        except ValueError:
            return []
        return [password, unquote(password)] if password else []

    found: list[str | None] = [
        settings.receiver.basic_auth_password,
        settings.receiver.metrics_token,
        settings.admin_token,
        *url_password(settings.redis.url),
    ]
    addresses: list[str] = []
    for integration in settings.integrations:
        signing = getattr(integration, "signing_secret", None)
        found += [signing, signing.removeprefix("whsec_") if signing else None]
        found.append(getattr(integration, "password", None))
        for value in (getattr(integration, "headers", None) or {}).values():
            found += [value, value.rsplit(" ", 1)[-1]]
        for attr in ("url", "dsn"):
            found += url_password(getattr(integration, attr, None))
        for attr in ("from_address", "reply_to", "username"):
            addresses += re.findall(r"[^\s<>]+@[^\s<>]+", getattr(integration, attr, None) or "")
        addresses += list(getattr(integration, "bcc", None) or [])
    secrets = sorted({s for s in found if s and len(s) >= MIN_SECRET_LENGTH})
    return secrets, sorted(set(addresses))


class _Tee:
    """A text stream that also appends what is written to a file."""

    def __init__(self, stream: Any, path: str) -> None:
        self._stream = stream
        self._copy = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115

    def write(self, text: str) -> int:
        written = self._stream.write(text)  # first: a bytes argument fails here, as it would have
        try:
            self._copy.write(text)
            self._copy.flush()
        except (OSError, ValueError):
            pass
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _install() -> None:
    directory = os.environ.get(TRANSCRIPTS_ENV)
    argv = list(getattr(sys, "orig_argv", []))
    if not directory or not os.path.isdir(directory) or not is_examhook(argv):
        return
    import json
    import secrets

    base = os.path.join(directory, f"{os.getpid()}-{secrets.token_hex(4)}")
    with open(base + ".argv.json", "w", encoding="utf-8") as file:
        json.dump(argv, file)
    if sys.stdout is not None:
        sys.stdout = _Tee(sys.stdout, base + ".stdout")
    if sys.stderr is not None:
        sys.stderr = _Tee(sys.stderr, base + ".stderr")
    try:
        import shared.settings as settings_module
    except ImportError:
        return
    original = settings_module.settings_from_dict

    def recording(raw: dict[str, Any], source: str | None = None) -> Any:
        settings = original(raw, source)
        found, addresses = settings_secrets(settings)
        with open(base + ".secrets.json", "a", encoding="utf-8") as file:
            file.write(json.dumps({"secrets": found, "addresses": addresses}) + "\n")
        return settings

    settings_module.settings_from_dict = recording


_install()
