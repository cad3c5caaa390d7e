"""``[integrations.when]``: which events an integration receives."""

from __future__ import annotations

from shared.payload import ExamResultsReleased
from shared.settings import When

_MISSING = object()


def _same(a: object, b: object) -> bool:
    # strict: True must not equal 1, "1" must not equal 1
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def matches(when: When, event: ExamResultsReleased) -> bool:
    """Every key present must match; a list key matches any of its values."""
    checks: list[tuple[list[str] | None, str | None]] = [
        (when.exam_ids, event.exam.id),
        (when.test_ids, event.test.id),
        (when.portal_ids, event.portal.id),
        (when.sub_portal_ids, event.user.sub_portal_id),
        (when.user_group_ids, event.exam.user_group.id),
        (when.grade_labels, event.attempt.grade.label),
    ]
    for allowed, value in checks:
        if allowed is not None and value not in allowed:
            return False
    if when.passed is not None and event.attempt.grade.is_pass is not when.passed:
        return False
    if when.custom_attributes:
        attributes = event.user.custom_attributes
        for key, expected in when.custom_attributes.items():
            if not _same(attributes.get(key, _MISSING), expected):
                return False
    return True
