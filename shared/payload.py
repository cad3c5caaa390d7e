"""The Synap "Exam Results Released" webhook body, as msgspec Structs.

Source of truth: Synap's published TypeScript interface (see the project README).
Field names stay Python-style; ``rename="camel"`` maps them to Synap's JSON names,
and the dashed ``exam.attr`` keys are named explicitly.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

import msgspec

# JSON scalars Synap allows in user.customAttributes.
CustomValue = str | int | float | bool | None

# Identifiers and timestamps have sane bounds: they end up in Redis keys, log lines and
# database columns, and no real one comes near them (a longer one is a 422 with its path).
MAX_ID_LENGTH = 256
MAX_TIMESTAMP_LENGTH = 64
Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
Timestamp = Annotated[str, msgspec.Meta(max_length=MAX_TIMESTAMP_LENGTH)]


class Base(msgspec.Struct, rename="camel", frozen=True, gc=False):
    """Base for every payload Struct.

    - ``rename="camel"``: ``time_started`` is ``timeStarted`` on the wire.
    - Unknown fields are ignored (msgspec's default): senders add fields over time,
      and an added field must never make a valid event fail.
    - ``frozen``: a decoded event is a fact; nothing downstream edits it.
    - ``gc=False``: a decoded body holds no reference cycles, so the garbage collector
      need not track it (decoding gets ~40% faster).
    - ``float`` fields accept JSON integers too (Synap's ``number``).
    """


class User(Base, frozen=True):
    id: Id
    name: str
    email: str
    sub_portal_id: Id | None = None
    custom_attributes: dict[str, CustomValue] = {}


class Portal(Base, frozen=True):
    id: Id


class Meta(Base, frozen=True):
    timestamp: Timestamp
    event_name: Id


class Grade(Base, frozen=True):
    label: str
    is_pass: bool
    min_score: float


class GradeCriteria(Base, frozen=True):
    grades: list[Grade]


class Instructions(Base, frozen=True):
    is_unlocked: bool
    did_progress: bool
    time_started: Timestamp
    time_completed: Timestamp
    time_spent_in_ms: float


class Results(Base, frozen=True):
    marking_status: str
    pending_marks: float
    status: str


class Deferred(Base, frozen=True):
    locked: bool


class AttemptState(Base, frozen=True):
    response_question_map: list[list[str]]
    is_revoked: bool
    is_started: bool
    time_started: Timestamp
    time_completed: Timestamp
    time_spent_in_ms: float
    results: Results
    deferred: Deferred
    instructions: Instructions | None = None


class Marks(Base, frozen=True):
    max_points: float
    credits: float
    penalties: float
    points: float


class Tags(Base, frozen=True):
    non_facet_tags: list[str]
    context: list[str]
    skill: list[str]
    difficulty: list[str]
    subtopic: list[str]
    topic: list[str]
    subject: list[str]
    module: list[str]
    exam: list[str]


class Ref(Base, frozen=True):
    id: Id


class Audit(Base, frozen=True):
    finalised_by: Id
    finalised_at: Timestamp
    released_by: Id
    released_at: Timestamp


class Attempt(Base, frozen=True):
    score: float
    score_frac: float
    total_answered_correctly: float
    grade: Grade
    grade_criteria: GradeCriteria
    id: Id
    is_exam: bool
    state: AttemptState
    marks: Marks
    total_questions: float
    tags: Tags
    total_answered: float
    time_started: Timestamp
    time_completed: Timestamp
    time_spent_in_ms: float
    status: str
    exam_status: str
    proctor_status: str | None
    assigned_moderating_markers: list[Ref]
    marker: Ref
    audit: Audit
    resit_count: float


class Test(Base, frozen=True):
    __test__ = False  # not a pytest test class
    id: Id
    title: str


class ExamAttr(Base, frozen=True):
    """Portal-specific custom attributes: every key optional, extra keys ignored."""

    exam_weight: float | None = msgspec.field(default=None, name="exam-weight")
    exam_group_id: Id | None = msgspec.field(default=None, name="exam-group-id")
    publish_exam_grade: bool | None = msgspec.field(default=None, name="publish-exam-grade")
    plagiarism_checker_enabled: bool | None = msgspec.field(default=None, name="plagiarism-checker-enabled")
    scoring_model: str | None = msgspec.field(default=None, name="scoring-model")
    qualification_name: str | None = msgspec.field(default=None, name="qualification_name")
    cohort_number: str | None = msgspec.field(default=None, name="cohort_number")


class UserGroup(Base, frozen=True):
    id: Id
    name: str


class Exam(Base, frozen=True):
    id: Id
    name: str
    resit_count: float
    source_tests: list[Id]
    user_group: UserGroup
    attr: ExamAttr = ExamAttr()


class ExamResultsReleased(Base, frozen=True):
    """The whole webhook body."""

    user: User
    portal: Portal
    meta: Meta
    attempt: Attempt
    test: Test
    id: Id
    time_started: Timestamp
    time_completed: Timestamp
    time_spent_in_ms: float
    exam: Exam


# Built once, reused for every request (msgspec decoders are cheap to call, not to build).
decoder = msgspec.json.Decoder(ExamResultsReleased)

_PATH_RE = re.compile(r" - at `(\$[^`]*)`$")


def error_path(error: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's message into (detail, JSON path); the path is ``$`` at the root."""
    message = str(error)
    match = _PATH_RE.search(message)
    if match is None:
        return message, "$"
    return message[: match.start()], match.group(1)


def release_time(event: ExamResultsReleased, now: float, max_future_skew: float) -> tuple[int, str | None]:
    """``attempt.audit.releasedAt`` as epoch milliseconds, and why it cannot be taken (or None).

    It must be an ISO 8601 timestamp (read as UTC without an offset) no more than
    ``max_future_skew`` seconds after ``now`` (epoch seconds): a release dated far ahead
    would make every real later release of the attempt look older, and so be skipped as
    superseded.
    """
    moment = parse_time(event.attempt.audit.released_at)
    if moment is None:
        return 0, "releasedAt is not an ISO 8601 timestamp"
    seconds = moment.timestamp()
    if seconds > now + max_future_skew:
        return 0, f"releasedAt is more than {max_future_skew:g} s in the future"
    return int(seconds * 1000), None


def parse_time(value: str) -> datetime | None:
    """An ISO 8601 timestamp (``2026-11-23T09:53:11.414Z``) as an aware datetime; without an
    offset it is read as UTC, never as this machine's zone. None when it is not one."""
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
