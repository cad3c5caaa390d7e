"""Re-releases: the release of the same attempt that a release replaces (a re-mark), so a
message can say it is an update and what it replaces (``P:releases:A``, every release of
an attempt by ``releasedAt``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from shared.contract import released_ms
from shared.payload import ExamResultsReleased, decoder
from shared.store import Store


@dataclass(frozen=True, slots=True)
class EarlierRelease:
    """The release of the same attempt that this one replaces (a re-release after a
    re-mark): when it was released, and its body while examhook still holds it."""

    released_at: str  # ISO 8601, as sent (or made from the stored release time)
    event: ExamResultsReleased | None = None


async def find_earlier_release(store: Store, event: ExamResultsReleased) -> EarlierRelease | None:
    """The release of the same attempt that ``event`` replaces, from ``P:releases:A`` (with
    its body while examhook still holds it); None for a first release."""
    found = await store.earlier_release(event.attempt.id, released_ms(event))
    if found is None:
        return None
    _, released, body = found
    earlier_event = None
    if body is not None:
        try:
            earlier_event = decoder.decode(body)
        except msgspec.DecodeError:
            earlier_event = None
    if earlier_event is not None:
        return EarlierRelease(earlier_event.attempt.audit.released_at, earlier_event)
    iso_text = datetime.fromtimestamp(released / 1000, tz=UTC).isoformat(timespec="milliseconds")
    return EarlierRelease(iso_text.replace("+00:00", "Z"))
