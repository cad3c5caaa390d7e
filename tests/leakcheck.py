"""The suite-wide leak check: what the product printed during the whole test session (every
log record at info and above, every ``examhook`` command's stdout and stderr) holds no secret
of the suite's configurations and no learner's email address or name.

How it works (installed by ``tests/conftest.py`` at session start, checked at session end):

* **Product output, collected three ways.**
  - Log records of the test process: ``logging.Logger.handle`` (the one call every record
    that passed its logger's level goes through, whatever handlers are installed or
    replaced meanwhile) is wrapped; records at INFO and above, from any logger except the
    suite's own (``tests.*``, and ``mail.log``: the test SMTP server's), are written with
    the product's JSON formatter to ``inprocess.log``. The root logger is set to INFO (and
    arq's and aiohttp's access loggers to WARNING), the levels the product runs with, so
    info records exist to be checked.
  - ``click.testing.CliRunner.invoke`` is wrapped: each in-process command's stdout and
    stderr, with its arguments.
  - Every ``examhook`` process the suite starts, however it is started (``subprocess``,
    ``asyncio``, Popen with inherited, piped or file output, ``receive --processes``
    children): ``tests/leaksite/sitecustomize.py`` (on ``PYTHONPATH``) tees its
    ``sys.stdout``/``sys.stderr`` to transcript files.
* **What is looked for.**
  - Secrets: those of every configuration built in the session, in the test process
    (``shared.settings.settings_from_dict`` wrapped) and in each ``examhook`` process (the
    same, from ``sitecustomize``): Basic and metrics passwords, admin tokens, Redis, URL
    and DSN passwords, signing secrets (and their keys), header values, SMTP passwords.
  - Learners: the sample learner's name and address (``shared/sample.json``), the names the
    suite's generators make (``tests/results_day.py``'s "Learner NumberN", ``send-sample``'s
    first and last names), and any unmasked email address at ``example.org`` (the domain of
    every learner of the suite) that is not an address a configuration sets (a sender,
    ``reply_to``, ``bcc``).
* **Where learner data is allowed.** The stdout of the commands that show learners to the
  operator by design (``report``, ``failures list/show``, ``retries list``,
  ``preview-email``, ``rejected show``: README "Personal data"). Secrets are allowed nowhere.
* **Verdict.** ``pytest_sessionfinish`` runs :func:`findings`; any finding is listed (the
  value masked) in the terminal summary and the session's exit status becomes 1.
  ``tests/test_leakcheck.py`` checks that each collection path is live and that a planted
  leak is found.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.leaksite.sitecustomize import TRANSCRIPTS_ENV, settings_secrets

ROOT = Path(__file__).resolve().parent.parent
SITE_DIR = Path(__file__).resolve().parent / "leaksite"

# loggers of the suite itself, not of the product: the tests' own, and aiosmtpd's (the SMTP
# server tests/smtp_sink.py runs as a destination logs every RCPT TO)
TEST_LOGGERS = ("tests", "mail.log")

# commands whose stdout shows learners to the operator, by design
LEARNER_VIEWS = {
    ("report",),
    ("failures", "list"),
    ("failures", "show"),
    ("retries", "list"),
    ("preview-email",),
    ("rejected", "show"),
}


@dataclass
class Source:
    """One piece of product output: where it came from and the file holding it."""

    origin: str  # "log", "stdout", "stderr"
    argv: list[str]
    path: Path

    @property
    def learner_view(self) -> bool:
        return self.origin == "stdout" and command_of(self.argv) in LEARNER_VIEWS

    def describe(self) -> str:
        if self.origin == "log":
            return "a log record of the test process"
        return f"{self.origin} of `examhook {' '.join(command_args(self.argv))}`"


def command_args(argv: list[str]) -> list[str]:
    """The arguments after the program (``python -m cli.main`` / ``examhook``)."""
    if len(argv) >= 3 and argv[1] == "-m":
        return argv[3:]
    return argv[2:] if len(argv) >= 2 and os.path.basename(argv[1]) == "examhook" else argv


def command_of(argv: list[str]) -> tuple[str, ...]:
    words = [a for a in command_args(argv) if not a.startswith("-")]
    for size in (2, 1):
        if tuple(words[:size]) in LEARNER_VIEWS:
            return tuple(words[:size])
    return tuple(words[:2])


@dataclass
class Collector:
    directory: Path
    secrets: set[str] = field(default_factory=set)
    addresses: set[str] = field(default_factory=set)
    runner_outputs: int = 0
    checked: dict[str, int] = field(default_factory=dict)
    _log: Any = None
    _undo: list[Any] = field(default_factory=list)

    # -- installing ------------------------------------------------------------------------

    @classmethod
    def start(cls) -> Collector:
        collector = cls(Path(tempfile.mkdtemp(prefix="examhook-leakcheck-")))
        collector._log = (collector.directory / "inprocess.log").open("a", encoding="utf-8")
        collector._install()
        return collector

    def _install(self) -> None:
        os.environ[TRANSCRIPTS_ENV] = str(self.directory)
        paths = [str(SITE_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)
        # the levels the product runs with (shared/logs.configure_logging): info, but arq's
        # per-job lines and aiohttp's access log only from warning on
        root = logging.getLogger()
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)
        for name in ("arq", "aiohttp.access"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)

        from shared.logs import JsonFormatter

        formatter = JsonFormatter()
        handle = logging.Logger.handle

        def handle_and_keep(logger: logging.Logger, record: logging.LogRecord) -> None:
            if record.levelno >= logging.INFO and not record.name.startswith(TEST_LOGGERS):
                with contextlib.suppress(Exception):  # never let the check break a test
                    self._log.write(formatter.format(record).replace("\n", "\\n") + "\n")
            handle(logger, record)

        logging.Logger.handle = handle_and_keep  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(logging.Logger, "handle", handle))

        from click.testing import CliRunner

        invoke = CliRunner.invoke

        def invoke_and_keep(runner: CliRunner, cli: Any, args: Any = None, *a: Any, **kw: Any) -> Any:
            result = invoke(runner, cli, args, *a, **kw)
            words = [args] if isinstance(args, str) else list(args or [])
            self.keep_cli_output(["python", "-m", "cli.main", *map(str, words)], result)
            return result

        CliRunner.invoke = invoke_and_keep  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(CliRunner, "invoke", invoke))

        import shared.settings

        build = shared.settings.settings_from_dict

        def build_and_keep(raw: dict[str, Any], source: str | None = None) -> Any:
            settings = build(raw, source)
            self.keep_settings(settings)
            return settings

        shared.settings.settings_from_dict = build_and_keep
        self._undo.append(lambda: setattr(shared.settings, "settings_from_dict", build))

    def stop(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self._log is not None:
            self._log.close()
            self._log = None
        os.environ.pop(TRANSCRIPTS_ENV, None)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- collecting ------------------------------------------------------------------------

    def keep_settings(self, settings: Any) -> None:
        found, addresses = settings_secrets(settings)
        self.secrets.update(found)
        self.addresses.update(a.casefold() for a in addresses)

    def keep_cli_output(self, argv: list[str], result: Any) -> None:
        self.runner_outputs += 1
        base = self.directory / f"runner-{self.runner_outputs}"
        (base.with_suffix(".argv.json")).write_text(json.dumps(argv))
        for name in ("stdout", "stderr"):
            with contextlib.suppress(ValueError, AttributeError):  # stderr not captured separately
                base.with_suffix(f".{name}").write_text(getattr(result, name), encoding="utf-8")

    def sources(self) -> Iterator[Source]:
        if self._log is not None:
            self._log.flush()
        yield Source("log", [], self.directory / "inprocess.log")
        for argv_file in sorted(self.directory.glob("*.argv.json")):
            argv = json.loads(argv_file.read_text())
            stem = argv_file.name.removesuffix(".argv.json")
            for origin in ("stdout", "stderr"):
                path = self.directory / f"{stem}.{origin}"
                if path.exists():
                    yield Source(origin, argv, path)

    def all_secrets(self) -> set[str]:
        found = set(self.secrets)
        for path in self.directory.glob("*.secrets.json"):
            for line in path.read_text().splitlines():
                data = json.loads(line)
                found.update(data["secrets"])
                self.addresses.update(a.casefold() for a in data["addresses"])
        return found


# -- what is looked for --------------------------------------------------------------------------


def learner_names() -> list[str]:
    sample = json.loads((ROOT / "shared" / "sample.json").read_text())
    from cli.sample import FIRST, LAST

    return [sample["user"]["name"], *(f"{first} {last}" for first in FIRST for last in LAST)]


_LEARNER_NAME_RE = re.compile(r"\bLearner Number\d+\b")
# an unmasked address at the suite's learners' domain (a masked one, l***@..., has no match)
_LEARNER_ADDRESS_RE = re.compile(r"(?<![\w.%+*-])[\w.%+-]+@example\.org(?:\.uk)?(?![\w.-])", re.IGNORECASE)


@dataclass
class Finding:
    kind: str
    value: str
    source: Source
    line: str

    def __str__(self) -> str:
        shown = self.line.replace(self.value, mask(self.value)).strip()
        if len(shown) > 240:
            at = max(0, shown.find(mask(self.value)) - 100)
            shown = "..." + shown[at : at + 240] + "..."
        return f"{self.kind} {mask(self.value)!r} in {self.source.describe()}: {shown}"


def mask(value: str) -> str:
    return value[:2] + "***" if len(value) > 4 else "***"


def _alternation(values: list[str]) -> re.Pattern[str] | None:
    """One pattern matching any of ``values`` (the longest first: a secret may contain another)."""
    if not values:
        return None
    return re.compile("|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True)))


def findings(collector: Collector, limit: int = 50) -> list[Finding]:
    """Every secret or learner datum in the product's output (the first ``limit``)."""
    secrets = _alternation(sorted(collector.all_secrets()))
    names = _alternation(learner_names())
    allowed = collector.addresses
    found: list[Finding] = []
    collector.checked = {"secrets": len(collector.all_secrets()), "outputs": 0, "lines": 0}
    for source in collector.sources():
        collector.checked["outputs"] += source.origin != "log"
        with source.path.open(encoding="utf-8", errors="replace") as text:
            for line in text:
                collector.checked["lines"] += 1
                if secrets is not None:
                    found += [Finding("secret", m.group(0), source, line) for m in secrets.finditer(line)]
                if not source.learner_view:
                    for pattern in (names, _LEARNER_NAME_RE):
                        if pattern is not None:
                            found += [
                                Finding("learner name", m.group(0), source, line)
                                for m in pattern.finditer(line)
                            ]
                    found += [
                        Finding("learner address", m.group(0), source, line)
                        for m in _LEARNER_ADDRESS_RE.finditer(line)
                        if m.group(0).casefold() not in allowed
                    ]
                if len(found) >= limit:
                    return found[:limit]
    return found
