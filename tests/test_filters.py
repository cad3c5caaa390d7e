"""``[integrations.when]``: which events each integration receives.

Unit tests of :func:`worker.filters.matches` for every key, the settings validation of
the ``when`` table, and one end-to-end run through the receiver and the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import Keys
from shared.payload import ExamResultsReleased, decoder
from shared.settings import ConfigError, FileIntegration, Settings, When, settings_from_dict
from tests.conftest import SAMPLE, WEBHOOK_HEADERS, eventually
from worker.filters import matches

SAMPLE_DATA: dict[str, Any] = json.loads(SAMPLE.read_bytes())


def event(**edits: Any) -> ExamResultsReleased:
    """The sample event with edits at dotted paths (``"user.subPortalId"``), via ``__``."""
    data = json.loads(json.dumps(SAMPLE_DATA))
    for path, value in edits.items():
        *parents, last = path.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
    return decoder.decode(json.dumps(data).encode())


SAMPLE_EVENT = event()


def when(**keys: Any) -> When:
    """A ``when`` table as the settings loader builds it (so types are converted the same way)."""
    raw = {"type": "file", "name": "f", "path": "/dev/null", "when": keys}
    settings = settings_from_dict({"integrations": [raw]})
    return settings.integrations[0].when


# -- every key --------------------------------------------------------------------------


def test_empty_when_matches_everything() -> None:
    """No ``when`` table (or an empty one) means every event."""
    assert matches(When(), SAMPLE_EVENT)
    assert matches(when(), event(user__subPortalId="sp_1"))


@pytest.mark.parametrize(
    ("key", "value", "other"),
    [
        ("exam_ids", "exm_maths_2026", "exm_physics_2026"),
        ("test_ids", "tst_maths_final", "tst_physics_final"),
        ("portal_ids", "portal_acme", "portal_other"),
        ("user_group_ids", "ug_2026a", "ug_2026b"),
        ("grade_labels", "Pass", "Merit"),
    ],
)
def test_list_keys_match_any_listed_value(key: str, value: str, other: str) -> None:
    """A list key matches when the event's value is one of the list (OR within the key),
    and not when it is absent from the list; matching is exact (case-sensitive)."""
    assert matches(when(**{key: [value]}), SAMPLE_EVENT)
    assert matches(when(**{key: [other, value]}), SAMPLE_EVENT)
    assert not matches(when(**{key: [other]}), SAMPLE_EVENT)
    assert not matches(when(**{key: [value.upper()]}), SAMPLE_EVENT)


def test_list_key_reads_the_right_field() -> None:
    """Each list key looks at its own field: exam.id, test.id, portal.id, exam.userGroup.id,
    attempt.grade.label (changing that field alone flips the result)."""
    cases = {
        "exam_ids": event(exam__id="exm_other"),
        "test_ids": event(test__id="tst_other"),
        "portal_ids": event(portal__id="portal_other"),
        "user_group_ids": event(exam__userGroup={"id": "ug_other", "name": "Other"}),
        "grade_labels": event(attempt__grade={"label": "Merit", "isPass": True, "minScore": 70}),
    }
    values = {
        "exam_ids": "exm_maths_2026",
        "test_ids": "tst_maths_final",
        "portal_ids": "portal_acme",
        "user_group_ids": "ug_2026a",
        "grade_labels": "Pass",
    }
    for key, changed in cases.items():
        assert matches(when(**{key: [values[key]]}), SAMPLE_EVENT), key
        assert not matches(when(**{key: [values[key]]}), changed), key


def test_empty_list_matches_nothing() -> None:
    """An empty list (``exam_ids = []``) matches no event: it is a list of allowed values
    with none in it, not "no constraint" (current behaviour, pinned deliberately)."""
    assert not matches(when(exam_ids=[]), SAMPLE_EVENT)


def test_sub_portal_ids() -> None:
    """sub_portal_ids matches user.subPortalId; an event without a sub-portal never matches
    a sub_portal_ids filter."""
    in_north = event(user__subPortalId="sp_north")
    assert matches(when(sub_portal_ids=["sp_north", "sp_south"]), in_north)
    assert not matches(when(sub_portal_ids=["sp_south"]), in_north)
    assert "subPortalId" not in SAMPLE_DATA["user"]
    assert not matches(when(sub_portal_ids=["sp_north"]), SAMPLE_EVENT)


def test_passed() -> None:
    """passed = true selects passing grades, passed = false failing ones (attempt.grade.isPass)."""
    failed = event(attempt__grade={"label": "Fail", "isPass": False, "minScore": 0})
    assert matches(when(passed=True), SAMPLE_EVENT)
    assert not matches(when(passed=True), failed)
    assert matches(when(passed=False), failed)
    assert not matches(when(passed=False), SAMPLE_EVENT)


def test_custom_attributes_equal_values_match() -> None:
    """Each custom attribute must equal the user's value: strings, integers, booleans."""
    assert matches(when(custom_attributes={"cohort": "2026-A"}), SAMPLE_EVENT)
    assert matches(when(custom_attributes={"employeeNo": 1007}), SAMPLE_EVENT)
    assert matches(when(custom_attributes={"fundingVerified": False}), SAMPLE_EVENT)
    assert matches(
        when(custom_attributes={"cohort": "2026-A", "employeeNo": 1007, "fundingVerified": False}),
        SAMPLE_EVENT,
    )
    assert not matches(when(custom_attributes={"cohort": "2026-B"}), SAMPLE_EVENT)
    assert not matches(when(custom_attributes={"cohort": "2026-a"}), SAMPLE_EVENT)


def test_custom_attributes_bool_and_int_are_not_interchangeable() -> None:
    """Strict types: false is not 0, true is not 1 (in either direction), and "1007" is not
    1007; integer and float of the same value are the same number."""
    assert not matches(when(custom_attributes={"fundingVerified": 0}), SAMPLE_EVENT)
    assert not matches(when(custom_attributes={"fundingVerified": "false"}), SAMPLE_EVENT)
    as_one = event(user__customAttributes={"flag": 1, "verified": True})
    assert not matches(when(custom_attributes={"flag": True}), as_one)
    assert not matches(when(custom_attributes={"verified": 1}), as_one)
    assert not matches(when(custom_attributes={"verified": 1.0}), as_one)
    assert matches(when(custom_attributes={"flag": 1, "verified": True}), as_one)
    assert not matches(when(custom_attributes={"employeeNo": "1007"}), SAMPLE_EVENT)
    assert matches(when(custom_attributes={"employeeNo": 1007.0}), SAMPLE_EVENT)


def test_custom_attributes_missing_and_null() -> None:
    """A key the user does not have never matches; a JSON null matches only None (which TOML
    cannot express, so only settings built in code can ask for it)."""
    assert not matches(when(custom_attributes={"department": "maths"}), SAMPLE_EVENT)
    assert matches(When(custom_attributes={"region": None}), SAMPLE_EVENT)
    assert not matches(When(custom_attributes={"department": None}), SAMPLE_EVENT)
    assert not matches(When(custom_attributes={"region": ""}), SAMPLE_EVENT)
    no_attributes = event(user__customAttributes={})
    assert not matches(when(custom_attributes={"cohort": "2026-A"}), no_attributes)


def test_keys_combine_with_and() -> None:
    """Every key present must match: one mismatching key rejects an event that all the other
    keys accept."""
    everything = {
        "exam_ids": ["exm_maths_2026"],
        "test_ids": ["tst_maths_final"],
        "portal_ids": ["portal_acme"],
        "user_group_ids": ["ug_2026a"],
        "passed": True,
        "grade_labels": ["Pass", "Merit"],
        "custom_attributes": {"cohort": "2026-A", "employeeNo": 1007},
    }
    assert matches(when(**everything), SAMPLE_EVENT)
    spoilers: dict[str, Any] = {
        "exam_ids": ["exm_other"],
        "test_ids": ["tst_other"],
        "portal_ids": ["portal_other"],
        "user_group_ids": ["ug_other"],
        "passed": False,
        "grade_labels": ["Distinction"],
        "custom_attributes": {"cohort": "2026-A", "employeeNo": 1008},
        "sub_portal_ids": ["sp_north"],
    }
    for key, wrong in spoilers.items():
        assert not matches(when(**{**everything, key: wrong}), SAMPLE_EVENT), key


FILTER_VALUES: dict[str, Any] = {
    "exam_ids": ["exm_maths_2026"],
    "test_ids": ["tst_maths_final"],
    "portal_ids": ["portal_acme"],
    "sub_portal_ids": ["sp_north"],
    "user_group_ids": ["ug_2026a"],
    "passed": True,
    "grade_labels": ["Pass"],
    "custom_attributes": {"cohort": "2026-A", "fundingVerified": False},
}
WRONG_VALUES: dict[str, Any] = {
    "exam_ids": ["x"],
    "test_ids": ["x"],
    "portal_ids": ["x"],
    "sub_portal_ids": ["x"],
    "user_group_ids": ["x"],
    "passed": False,
    "grade_labels": ["x"],
    "custom_attributes": {"fundingVerified": 0},
}


@given(
    right=st.sets(st.sampled_from(sorted(FILTER_VALUES))),
    wrong=st.sets(st.sampled_from(sorted(WRONG_VALUES))),
)
def test_and_property(right: set[str], wrong: set[str]) -> None:
    """For any combination of keys, the event matches exactly when none of them carries a
    value the event does not have (AND across keys, independent of which keys are used)."""
    subject = event(user__subPortalId="sp_north")
    keys = {k: FILTER_VALUES[k] for k in right - wrong} | {k: WRONG_VALUES[k] for k in wrong}
    assert matches(when(**keys), subject) is (not wrong)


# -- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["exam_id", "exams", "passed_only", "grade", "custom_attribute", "portal"])
def test_unknown_filter_key_is_a_config_error(key: str) -> None:
    """A misspelt ``when`` key is a ConfigError naming the key, never a filter that is
    silently ignored (which would deliver everything)."""
    raw = {"type": "file", "name": "f", "path": "/tmp/f.jsonl", "when": {key: ["x"]}}
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"integrations": [raw]})
    assert str(caught.value) == f"integrations[0].when.{key}: unknown key"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("exam_ids", "exm_maths_2026"),  # a string, not a list
        ("passed", "yes"),
        ("grade_labels", [1]),
        ("custom_attributes", ["cohort"]),
    ],
)
def test_wrongly_typed_filter_value_is_a_config_error(key: str, value: Any) -> None:
    """A ``when`` value of the wrong type is a ConfigError naming the key."""
    raw = {"type": "file", "name": "f", "path": "/tmp/f.jsonl", "when": {key: value}}
    with pytest.raises(ConfigError, match=rf"^integrations\[0\]\.when\.{key}"):
        settings_from_dict({"integrations": [raw]})


def test_toml_types_survive_loading(tmp_path: Path) -> None:
    """From a TOML file, booleans stay booleans and integers stay integers, so the strict
    comparison sees what the operator wrote."""
    from shared.settings import load_settings

    config = tmp_path / "examhook.toml"
    config.write_text(
        '[[integrations]]\ntype = "file"\nname = "f"\npath = "/tmp/f.jsonl"\n'
        '[integrations.when]\nexam_ids = ["exm_maths_2026"]\n'
        'custom_attributes = { fundingVerified = false, employeeNo = 1007, cohort = "2026-A" }\n'
    )
    settings = load_settings(config, env={})
    attributes = settings.integrations[0].when.custom_attributes
    assert attributes == {"fundingVerified": False, "employeeNo": 1007, "cohort": "2026-A"}
    assert attributes is not None
    assert type(attributes["fundingVerified"]) is bool
    assert type(attributes["employeeNo"]) is int
    assert matches(settings.integrations[0].when, SAMPLE_EVENT)


# -- end to end ----------------------------------------------------------------------------


async def _idle(redis: Redis, prefix: str) -> bool:
    """No job of this prefix queued, running or stored."""
    if await redis.zcard(Keys(prefix).queue):
        return False
    for pattern in (f"arq:in-progress:{prefix}:*", f"arq:job:{prefix}:*"):
        async for _ in redis.scan_iter(match=pattern, count=1000):
            return False
    return True


async def test_each_integration_gets_only_matching_events(
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    start_worker: Callable[..., Any],
    redis: Redis,
    prefix: str,
    tmp_path: Path,
    sample_body: bytes,
) -> None:
    """Two file integrations with different filters: an event matching one is written to
    that file only (the other stays empty); an event matching neither is written nowhere and
    recorded in ``<prefix>:unmatched``."""
    maths_file, physics_file = tmp_path / "maths.jsonl", tmp_path / "physics.jsonl"
    settings = make_settings(
        [
            {
                "type": "file",
                "name": "maths",
                "path": str(maths_file),
                "when": {"exam_ids": ["exm_maths_2026"], "passed": True},
            },
            {
                "type": "file",
                "name": "physics",
                "path": str(physics_file),
                "when": {"exam_ids": ["exm_physics_2026"]},
            },
        ]
    )
    assert all(isinstance(i, FileIntegration) for i in settings.integrations)
    client = await aiohttp_client(create_app(settings))

    async def post(body: bytes) -> str:
        response = await client.post(WEBHOOK_PATH, data=body, headers=WEBHOOK_HEADERS)
        assert response.status == 202, await response.text()
        return str((await response.json())["event_id"])

    maths_id = await post(sample_body)
    history = json.loads(sample_body)
    history["attempt"]["id"] = "att_history_1"
    history["exam"]["id"] = "exm_history_2026"
    history_id = await post(json.dumps(history).encode())

    await start_worker(settings)
    unmatched = Keys(prefix).unmatched
    await eventually(lambda: redis.zscore(unmatched, history_id))
    await eventually(lambda: _idle(redis, prefix))

    lines = maths_file.read_text().splitlines()
    assert [json.loads(line)["event_id"] for line in lines] == [maths_id]
    assert json.loads(lines[0])["payload"] == json.loads(sample_body)
    assert not physics_file.exists() or physics_file.stat().st_size == 0
    assert await redis.zrange(unmatched, 0, -1) == [history_id.encode()]
    assert await redis.hget(Keys(prefix).stats, "unmatched") == b"1"
