"""Results-day commands: ``report``, ``replay``, ``preview-email``, ``retries``, and
``rejected replay`` (registered on the ``examhook`` group by :func:`register`).

Learner data printed here is the operator's own; none of it is logged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import msgspec

from cli.common import (
    check_integration,
    config_option,
    data_dir_option,
    dev_state,
    fail,
    inspection_settings,
    json_option,
    learner_label,
    print_json,
    print_table,
    run_inspection,
    settings_or_exit,
)
from shared.inspection import Inspector
from shared.report import STATES, Reporter, Target, exam_csv, summary_csv
from shared.settings import FileIntegration, Settings


def parse_duration(
    ctx: click.Context | None, param: click.Parameter | None, value: str | None
) -> float | None:
    """Click callback: ``30m``, ``12h``, ``7d`` or seconds, as seconds."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value[-1] in units else float(value)
    except (ValueError, IndexError):
        raise click.BadParameter(f"{value!r} is not a duration like 30m, 12h or 7d") from None
    if seconds <= 0:
        raise click.BadParameter(f"{value!r} must be more than 0")
    return seconds


def results_settings(config_path: str | None, data_dir: str) -> Settings:
    """Settings as the worker has them: the inspection commands' Redis, and with no
    integration configured next to a running ``examhook dev``, the ``local-file`` integration
    dev delivers to."""
    settings = inspection_settings(config_path, data_dir)
    if not settings.integrations and dev_state(data_dir) is not None:
        local = FileIntegration(name="local-file", path=str(Path(data_dir).resolve() / "deliveries.jsonl"))
        settings = msgspec.structs.replace(settings, integrations=[local])
    return settings


def _targets(settings: Settings) -> list[Target]:
    if not settings.integrations:
        click.echo(
            "examhook: no integration is configured (is this the worker's configuration? --config)",
            err=True,
        )
    return Target.of(settings.integrations)


# -- report --------------------------------------------------------------------------------------


@click.command()
@click.option("--exam", "exam_id", default=None, help="One row per learner's event of this exam.")
@click.option(
    "--since",
    default="7d",
    show_default=True,
    callback=parse_duration,
    help="Exams with an event this recent (30m, 12h, 7d).",
)
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="CSV (for a spreadsheet).")
@data_dir_option
@config_option
def report(
    exam_id: str | None, since: float, as_json: bool, as_csv: bool, data_dir: str, config_path: str | None
) -> None:
    """Who got their result, everywhere it should go: per exam, or per learner of one exam."""
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    settings = results_settings(config_path, data_dir)
    targets = _targets(settings)
    names = [t.name for t in targets]
    if exam_id is not None:
        rows = run_inspection(settings, lambda i: Reporter(i.store, targets).exam(exam_id))
        if as_csv:
            click.echo(exam_csv(rows, names), nl=False)
        elif as_json:
            print_json([msgspec.to_builtins(r) for r in rows])
        else:
            _print_exam(exam_id, rows, names)
        return
    summaries = run_inspection(settings, lambda i: Reporter(i.store, targets).summary(since))
    if as_csv:
        click.echo(summary_csv(summaries, names), nl=False)
    elif as_json:
        print_json([msgspec.to_builtins(s) for s in summaries])
    else:
        _print_summary(summaries, names)


def _print_summary(summaries: list[Any], names: list[str]) -> None:
    if not summaries:
        click.echo("no exams in this window")
        return
    table = []
    for s in summaries:
        first = {"exam_id": s.exam_id, "exam_name": s.exam_name, "events": s.events, "learners": s.learners}
        for n, name in enumerate(names or [""]):
            counts = s.integrations.get(name, {})
            row = first if n == 0 else {}
            table.append({**row, "integration": name, **counts})
    print_table(table, ["exam_id", "exam_name", "events", "learners", "integration", *STATES])


def _print_exam(exam_id: str, rows: list[Any], names: list[str]) -> None:
    if not rows:
        click.echo(f"no events of exam {exam_id} (unknown, or older than the payload retention)")
        return
    for name in names:
        counts = dict.fromkeys(STATES, 0)
        for row in rows:
            counts[row.integrations[name]] += 1
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        click.echo(f"{name}: {summary}")
    click.echo()
    table = [
        {
            "event_id": r.event_id,
            "user_id": r.user_id,
            "name": r.user_name or ("(expired)" if r.expired else ""),
            "email": r.user_email,
            "released_at": r.released_at,
            **r.integrations,
        }
        for r in rows
    ]
    print_table(table, ["event_id", "user_id", "name", "email", "released_at", *names])


# -- replay --------------------------------------------------------------------------------------


@click.command()
@click.option("--exam", "exam_id", default=None, help="Replay this exam's events.")
@click.option("--unmatched", is_flag=True, help="Replay the events that matched no integration.")
@click.option("--integration", default=None, help="Only to this integration.")
@click.option(
    "--since", default=None, callback=parse_duration, help="Only events that arrived this recently (12h, 2d)."
)
@click.option("--dry-run", is_flag=True, help="Change nothing; print what would be queued.")
@json_option
@data_dir_option
@config_option
def replay(
    exam_id: str | None,
    unmatched: bool,
    integration: str | None,
    since: float | None,
    dry_run: bool,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """Send an exam's events again on purpose (same event ids, same Idempotency-Keys).

    For a destination restored from backup, or an integration added after the release.
    Deliveries queued, being sent or waiting for a retry are left alone (skipped)."""
    from shared.replay import Replayer

    if (exam_id is None) == (not unmatched):
        raise click.UsageError("give --exam EXAM_ID or --unmatched")
    if unmatched and since is not None:
        raise click.UsageError("--since goes with --exam")
    settings = results_settings(config_path, data_dir)
    check_integration(settings, integration, stored=False)  # replay sends: it must be configured
    targets = _targets(settings)

    async def work(inspector: Inspector) -> Any:
        replayer = Replayer(inspector.store, targets)
        if exam_id is not None:
            return await replayer.exam(exam_id, integration=integration, since_seconds=since, dry_run=dry_run)
        return await replayer.unmatched(integration=integration, dry_run=dry_run)

    result = run_inspection(settings, work)
    if as_json:
        print_json(result.as_dict())
        return
    verb = "would queue" if dry_run else "queued"
    reasons = ", ".join(f"{n} {r}" for r, n in result.skipped.items() if n)
    line = f"{verb} {result.queued} deliveries of {result.events} events, skipped {result.skipped_total}"
    click.echo(line + (f" ({reasons})" if reasons else ""))
    for name, counts in result.as_dict()["per_integration"].items():
        click.echo(f"  {name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


# -- rejected replay -----------------------------------------------------------------------------


@click.command("replay")
@click.argument("reject_ids", nargs=-1, required=True)
@json_option
@data_dir_option
@config_option
def rejected_replay(
    reject_ids: tuple[str, ...], as_json: bool, data_dir: str, config_path: str | None
) -> None:
    """Submit quarantined bodies again, as if they had just arrived (after a fix or an
    upgrade of the payload model): accepted, duplicate, or still rejected with the error."""
    from dataclasses import asdict

    from shared.replay import replay_rejected

    settings = inspection_settings(config_path, data_dir)
    results = run_inspection(settings, lambda i: replay_rejected(i.store, list(reject_ids)))
    if as_json:
        print_json([asdict(r) for r in results])
    else:
        for r in results:
            if r.result in ("accepted", "duplicate"):
                click.echo(f"{r.reject_id}: {r.result} {r.event_id}")
            else:
                where = f" at {r.path}" if r.path else ""
                click.echo(f"{r.reject_id}: {r.result}: {r.error}{where}: {r.detail}")
    if any(r.result in ("rejected", "unknown") for r in results):
        sys.exit(1)


# -- retries -------------------------------------------------------------------------------------


@click.group()
def retries() -> None:
    """Deliveries waiting for a retry: list them, or make them due now."""


@retries.command("list")
@click.option("--integration", default=None)
@json_option
@data_dir_option
@config_option
def retries_list(integration: str | None, as_json: bool, data_dir: str, config_path: str | None) -> None:
    """One row per delivery waiting for a retry: learner, integration, attempts, last error."""
    from shared.retries import waiting_retries

    settings = inspection_settings(config_path, data_dir)
    check_integration(settings, integration)
    rows = run_inspection(settings, lambda i: waiting_retries(i.store, integration))
    data = [msgspec.to_builtins(r) for r in rows]
    if as_json:
        print_json(data)
        return
    for row in data:
        row["learner"] = learner_label(row)
        row["due_in"] = f"{row['due_in_seconds']:g}s"
    print_table(
        data,
        ["event_id", "integration", "learner", "exam_id", "attempts", "due_in", "last_error"],
        empty="no deliveries are waiting for a retry",
    )


@retries.command("now")
@click.argument("event_ids", nargs=-1)
@click.option("--integration", default=None, help="Only the retries of this integration.")
@click.option("--all", "all_", is_flag=True, help="Every waiting retry.")
@json_option
@data_dir_option
@config_option
def retries_now(
    event_ids: tuple[str, ...],
    integration: str | None,
    all_: bool,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """Make waiting retries due now (the destination is back): of --integration, of the
    given EVENT_IDs, or --all. Prints how many."""
    from shared.retries import hurry

    if not (event_ids or integration or all_):
        raise click.UsageError("give --integration NAME, EVENT_ID..., or --all")
    settings = inspection_settings(config_path, data_dir)
    check_integration(settings, integration)
    moved = run_inspection(settings, lambda i: hurry(i.store, integration, list(event_ids) or None))
    if as_json:
        print_json({"due_now": moved})
    else:
        click.echo(f"made {moved} waiting retries due now")


# -- preview-email -------------------------------------------------------------------------------


@click.command("preview-email")
@click.option("--integration", default=None, help="The email integration (default: the only one).")
@click.option("--event", "event_id", default=None, help="A stored event (read from Redis).")
@click.option("--file", "body_file", type=click.Path(dir_okay=False), default=None, help="A webhook body.")
@click.option("--fail", "failing", is_flag=True, help="The failing variant of the sample event.")
@click.option("--html", "with_html", is_flag=True, help="Also print the HTML part.")
@json_option
@data_dir_option
@config_option
def preview_email(
    integration: str | None,
    event_id: str | None,
    body_file: str | None,
    failing: bool,
    with_html: bool,
    as_json: bool,
    data_dir: str,
    config_path: str | None,
) -> None:
    """Print the message the email integration would send (headers and text part), for the
    sample event, a stored event or a body file. Sends nothing, connects to no SMTP server."""
    from shared.preview import PreviewError, build_preview, email_config, load_sample

    if sum((event_id is not None, body_file is not None, failing)) > 1:
        raise click.UsageError("give at most one of --event, --file, --fail")
    settings = settings_or_exit(config_path)
    check_integration(settings, integration, stored=False)  # a preview needs its configuration
    try:
        config, note = email_config(settings, integration)
    except PreviewError as exc:
        fail(str(exc))
    if note:
        click.echo(f"examhook: {note}", err=True)
    try:
        if event_id is not None:
            from shared.preview import load_stored

            stored = inspection_settings(config_path, data_dir)
            body, earlier = run_inspection(stored, lambda i: load_stored(i.store, event_id))
        elif body_file is not None:
            try:
                body = Path(body_file).read_bytes()
            except OSError as exc:
                fail(f"{body_file}: cannot read: {exc.strerror}")
            earlier = None
        else:
            body, earlier = load_sample(failing), None
        preview = build_preview(config, body, earlier)
    except PreviewError as exc:
        fail(str(exc), code=1)
    if as_json:
        print_json(preview.as_dict(with_html=True))
        return
    click.echo(preview.as_text(with_html=with_html), nl=False)


def register(cli: click.Group, rejected: click.Group) -> None:
    """Add the results-day commands to the ``examhook`` group."""
    for command in (report, replay, preview_email, retries):
        cli.add_command(command)
    rejected.add_command(rejected_replay)
