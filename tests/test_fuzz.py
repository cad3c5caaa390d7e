"""Property-based and hostile-input tests of the payload model and the receiver endpoint.

Every request here goes to the real receiver (``create_app`` behind pytest-aiohttp's
test server, on the test's Redis and key prefix). The properties that must hold for
*any* body, however broken:

- the answer is one of the documented statuses (200, 202, 400, 413, 415, 422): never a
  5xx, never an unhandled exception inside the server;
- a 422 names the JSON path of the problem, starting with ``$``;
- a 400/422 body is quarantined: its ``rejected_id`` is in ``<prefix>:rejected`` and the
  stored copy is the body as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ingest.app import WEBHOOK_PATH, create_app
from shared.contract import Keys
from shared.payload import ExamResultsReleased, decoder
from shared.settings import Settings
from tests.conftest import SAMPLE, SYNAP_BASIC

AUTH = {"Authorization": SYNAP_BASIC}
JSON = {"Content-Type": "application/json", **AUTH}
DOCUMENTED = {200, 202, 400, 413, 415, 422}
SAMPLE_DATA: dict[str, Any] = json.loads(SAMPLE.read_bytes())

# Modest example counts: the whole file runs in well under 40 s. No example database.
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

Client = TestClient[Any, Any]


# -- fixtures and helpers ---------------------------------------------------------------


@pytest.fixture
def fuzz_settings(make_settings: Any) -> Settings:
    # many examples are rejected on purpose: keep every one of them in the quarantine
    return make_settings(retention={"rejected_max": 1_000_000})


@pytest.fixture
async def client(aiohttp_client: Any, fuzz_settings: Settings) -> Client:
    return await aiohttp_client(create_app(fuzz_settings))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def server_errors(request: pytest.FixtureRequest) -> Iterator[list[logging.LogRecord]]:
    """Every ERROR record logged while the test runs (aiohttp logs unhandled handler
    exceptions as ``Error handling request``); the test fails if there is any. (Tests
    marked xfail for a known bug fail on the status already; their teardown stays quiet.)"""
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
    unhandled = [r for r in handler.records if r.exc_info or r.name.startswith("aiohttp")]
    if request.node.get_closest_marker("xfail") is None:
        assert not unhandled, [f"{r.name}: {r.getMessage()}" for r in unhandled]


def jtype(value: Any) -> str:
    """The JSON type of a decoded value (integers and floats are both ``number``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


ONE_OF_EACH_TYPE: dict[str, Any] = {
    "null": None,
    "bool": True,
    "number": 7,
    "string": "x",
    "array": [],
    "object": {},
}

JPath = tuple[str | int, ...]


def paths(value: Any, prefix: JPath = ()) -> Iterator[JPath]:
    """Every path in a JSON document, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def get(doc: Any, path: JPath) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def replaced(doc: Any, path: JPath, value: Any) -> Any:
    if not path:
        return value
    out = copy.deepcopy(doc)
    get(out, path[:-1])[path[-1]] = value
    return out


def msgspec_path(path: JPath) -> str:
    """A path as msgspec writes it in errors: ``$.a.b[0]``; keys of a dict-typed field
    (``user.customAttributes``) are written ``[...]``."""
    out = "$"
    for i, part in enumerate(path):
        if isinstance(part, int):
            out += f"[{part}]"
        elif path[:i] == ("user", "customAttributes"):
            out += "[...]"
        else:
            out += f".{part}"
    return out


async def post(client: Client, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return await client.post(WEBHOOK_PATH, data=body, headers=headers or JSON)


async def check(
    client: Client,
    redis: Redis,
    prefix: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """POST ``body`` and assert the properties every answer must have; return (status, JSON)."""
    response = await post(client, body, headers)
    status = response.status
    assert status in DOCUMENTED, (status, await response.text(), body[:300])
    answer = await response.json() if response.content_type == "application/json" else None
    if status == 422:
        assert answer is not None
        assert answer["error"] == "invalid_payload"
        assert answer["path"].startswith("$"), answer
    if status in (400, 422):
        assert answer is not None
        keys = Keys(prefix)
        assert await redis.zscore(keys.rejected, answer["rejected_id"]) is not None, answer
        stored = msgspec.json.decode(await redis.get(keys.rejected_item(answer["rejected_id"])))
        assert stored["body"] == body.decode("utf-8", errors="replace")
        assert stored["error"] == answer["error"]
    return status, answer


# -- the payload model on its own ------------------------------------------------------


@FUZZ
@given(value=json_values)
def test_model_rejects_random_json_only_with_validation_errors(value: Any) -> None:
    """Decoding any JSON value with the payload model either succeeds or raises
    msgspec.ValidationError whose path starts with ``$`` — nothing else escapes."""
    from shared.payload import error_path

    try:
        decoder.decode(json.dumps(value).encode())
    except msgspec.ValidationError as exc:
        _, path = error_path(exc)
        assert path.startswith("$")


@FUZZ
@given(raw=st.binary(max_size=200))
def test_model_on_random_bytes_raises_only_decode_errors(raw: bytes) -> None:
    """Any byte string either decodes or raises a msgspec.DecodeError (ValidationError is one)."""
    with contextlib.suppress(msgspec.DecodeError):
        decoder.decode(raw)


def test_sample_round_trips_through_the_model() -> None:
    """The sample decodes, and re-encoding the Struct gives the same data (names and values)."""
    event = decoder.decode(json.dumps(SAMPLE_DATA).encode())
    assert isinstance(event, ExamResultsReleased)
    again = msgspec.json.decode(msgspec.json.encode(event))
    assert again["attempt"]["audit"] == SAMPLE_DATA["attempt"]["audit"]
    assert again["user"]["customAttributes"] == SAMPLE_DATA["user"]["customAttributes"]


# -- the endpoint: random and mutated bodies -------------------------------------------


@FUZZ
@given(value=json_values)
async def test_random_json_bodies_are_422_and_quarantined(
    client: Client,
    redis: Redis,
    prefix: str,
    value: Any,
) -> None:
    """Any random JSON value (not an event) gets 422 with a ``$`` path, and is quarantined."""
    status, _ = await check(client, redis, prefix, json.dumps(value).encode())
    assert status == 422


@FUZZ
@given(raw=st.binary(max_size=300))
async def test_random_bytes_are_answered_with_a_documented_status(
    client: Client,
    redis: Redis,
    prefix: str,
    raw: bytes,
) -> None:
    """Random bytes get 400 (not JSON / not UTF-8) or 422 (JSON, not an event), quarantined."""
    status, _ = await check(client, redis, prefix, raw)
    assert status in (400, 422)


@st.composite
def retyped_sample(draw: st.DrawFn) -> tuple[bytes, JPath]:
    """The sample with one random path's value replaced by a random value of another type."""
    every = list(paths(SAMPLE_DATA))
    path = draw(st.sampled_from(every))
    original = get(SAMPLE_DATA, path)
    value = draw(json_values.filter(lambda v: jtype(v) != jtype(original)))
    return json.dumps(replaced(SAMPLE_DATA, path, value)).encode(), path


@FUZZ
@given(case=retyped_sample())
async def test_sample_with_a_retyped_value(
    client: Client,
    redis: Redis,
    prefix: str,
    case: tuple[bytes, JPath],
) -> None:
    """The sample with a value of another type somewhere is accepted (the model allows it
    there) or 422 at a path that is that path or inside it — never anything else."""
    body, path = case
    status, answer = await check(client, redis, prefix, body)
    assert status in (200, 202, 422)
    if status == 422:
        assert answer is not None
        assert answer["path"].startswith(msgspec_path(path)), (answer, path)


@st.composite
def sample_without_keys(draw: st.DrawFn) -> tuple[bytes, list[JPath]]:
    """The sample with 1-3 random object keys deleted."""
    doc = copy.deepcopy(SAMPLE_DATA)
    deleted: list[JPath] = []
    for _ in range(draw(st.integers(1, 3))):
        keyed = [p for p in paths(doc) if p and isinstance(p[-1], str)]
        path = draw(st.sampled_from(keyed))
        del get(doc, path[:-1])[path[-1]]
        deleted.append(path)
    return json.dumps(doc).encode(), deleted


@FUZZ
@given(case=sample_without_keys())
async def test_sample_with_deleted_keys(
    client: Client,
    redis: Redis,
    prefix: str,
    case: tuple[bytes, list[JPath]],
) -> None:
    """Deleting keys gives 202/200 (they were optional) or 422 naming the object that lost a
    required field — the parent of one of the deleted keys."""
    body, deleted = case
    status, answer = await check(client, redis, prefix, body)
    assert status in (200, 202, 422)
    if status == 422:
        assert answer is not None
        assert answer["path"] in {msgspec_path(p[:-1]) for p in deleted}, (answer, deleted)
        assert "missing required field" in answer["detail"]


@st.composite
def sample_with_added_keys(draw: st.DrawFn) -> bytes:
    """The sample with 1-4 unknown keys added to random objects (any JSON value, or a
    scalar inside ``user.customAttributes`` whose values must be scalars)."""
    doc = copy.deepcopy(SAMPLE_DATA)
    for _ in range(draw(st.integers(1, 4))):
        objects = [p for p in paths(doc) if isinstance(get(doc, p), dict)]
        path = draw(st.sampled_from(objects))
        target = get(doc, path)
        key = "fuzz_" + draw(st.text(max_size=10))
        strategy = json_scalars if path == ("user", "customAttributes") else json_values
        target[key] = draw(strategy)
    return json.dumps(doc, ensure_ascii=False).encode()


@FUZZ
@given(body=sample_with_added_keys())
async def test_unknown_keys_never_make_an_event_invalid(
    client: Client,
    redis: Redis,
    prefix: str,
    body: bytes,
) -> None:
    """Unknown fields are accepted anywhere (senders add fields over time): 202 or 200."""
    status, answer = await check(client, redis, prefix, body)
    assert status in (200, 202), answer


@st.composite
def mutated_sample(draw: st.DrawFn) -> bytes:
    """The sample after 1-5 random edits: retype a value, delete a key, add a key."""
    doc: Any = copy.deepcopy(SAMPLE_DATA)
    for _ in range(draw(st.integers(1, 5))):
        every = list(paths(doc))
        op = draw(st.sampled_from(["retype", "delete", "add"]))
        if op == "retype":
            path = draw(st.sampled_from(every))
            kind = jtype(get(doc, path))
            other_kind: Any = json_values.filter(lambda v, kind=kind: jtype(v) != kind)  # type: ignore[arg-type]
            doc = replaced(doc, path, draw(other_kind))
        elif op == "delete":
            keyed = [p for p in every if p and isinstance(p[-1], str)]
            if keyed:
                path = draw(st.sampled_from(keyed))
                del get(doc, path[:-1])[path[-1]]
        else:
            objects = [p for p in every if isinstance(get(doc, p), dict)]
            if objects:
                get(doc, draw(st.sampled_from(objects)))[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(doc, ensure_ascii=False).encode()


@FUZZ
@given(body=mutated_sample())
async def test_mutated_samples_get_documented_answers(
    client: Client,
    redis: Redis,
    prefix: str,
    body: bytes,
) -> None:
    """Any combination of edits to the sample is accepted or 422 with a path, quarantined."""
    status, _ = await check(client, redis, prefix, body)
    assert status in (200, 202, 422)


# -- the endpoint: a wrong type at every path of the sample ----------------------------

# (path, JSON type of the replacement) combinations the model accepts.
OPTIONAL = {
    ("attempt", "proctorStatus"),
    ("attempt", "state", "instructions"),
    *(("exam", "attr", key) for key in SAMPLE_DATA["exam"]["attr"]),
}


def accepted_by_model(path: JPath, kind: str) -> bool:
    if kind == "null" and path in OPTIONAL:
        return True
    if kind == "string" and path == ("attempt", "proctorStatus"):  # str | None, null in the sample
        return True
    # user.customAttributes values: any JSON scalar
    return path[:2] == ("user", "customAttributes") and len(path) == 3 and kind not in ("array", "object")


async def test_a_wrong_type_at_every_path_of_the_sample(
    client: Client,
    redis: Redis,
    prefix: str,
) -> None:
    """For every path of the sample and every JSON type other than the value's own, the
    body is 422 with exactly that path (and quarantined) — unless the model allows that
    type there (null for optional fields, scalars in customAttributes), then 202/200."""
    combinations = 0
    for path in paths(SAMPLE_DATA):
        if path[:3] == ("attempt", "state", "responseQuestionMap") and len(path) > 3 and int(path[3]) >= 2:
            continue  # 30 entries of the same shape: the first two stand for all
        original = jtype(get(SAMPLE_DATA, path))
        for kind, value in ONE_OF_EACH_TYPE.items():
            if kind == original:
                continue
            combinations += 1
            body = json.dumps(replaced(SAMPLE_DATA, path, value)).encode()
            status, answer = await check(client, redis, prefix, body)
            if accepted_by_model(path, kind):
                assert status in (200, 202), (path, kind, answer)
            else:
                assert status == 422, (path, kind, answer)
                assert answer is not None
                assert answer["path"] == msgspec_path(path), (path, kind, answer)
    assert combinations > 600


# -- the endpoint: hostile bodies ------------------------------------------------------


def sample_with(fragment_at_region: bytes) -> bytes:
    """The sample's JSON text with ``user.customAttributes.region`` replaced by raw JSON text."""
    text = json.dumps(SAMPLE_DATA).encode()
    assert text.count(b'"region": null') == 1
    return text.replace(b'"region": null', b'"region": ' + fragment_at_region)


def sample_with_unknown_field(fragment: bytes) -> bytes:
    """The sample's JSON text with an extra top-level field ``fuzz`` holding raw JSON text."""
    text = json.dumps(SAMPLE_DATA).encode()
    return text[:-1] + b', "fuzz": ' + fragment + b"}"


DEEP = b"[" * 10_000 + b"]" * 10_000


async def test_deep_nesting_at_the_root_and_in_a_known_field(
    client: Client,
    redis: Redis,
    prefix: str,
) -> None:
    """10,000 nested arrays as the whole body, or where a scalar is expected, are a 422."""
    status, answer = await check(client, redis, prefix, DEEP)
    assert (status, answer and answer["path"]) == (422, "$")
    status, answer = await check(client, redis, prefix, sample_with(DEEP))
    assert (status, answer and answer["path"]) == (422, "$.user.customAttributes[...]")
    deep_objects = b'{"id": ' * 10_000 + b"1" + b"}" * 10_000
    status, answer = await check(
        client,
        redis,
        prefix,
        json.dumps(SAMPLE_DATA)
        .encode()
        .replace(b'"portal": {"id": "portal_acme"}', b'"portal": ' + deep_objects),
    )
    assert (status, answer and answer["path"]) == (422, "$.portal.id")


async def test_deep_nesting_in_an_unknown_field(
    client: Client,
    redis: Redis,
    prefix: str,
) -> None:
    """10,000 nested arrays (or objects) in a field the model ignores are answered with a
    documented status (400 or 422) and quarantined — not a 500."""
    status, _ = await check(client, redis, prefix, sample_with_unknown_field(DEEP))
    assert status in (400, 422)
    deep_objects = b'{"a": ' * 10_000 + b"1" + b"}" * 10_000
    status, _ = await check(client, redis, prefix, sample_with_unknown_field(deep_objects))
    assert status in (400, 422)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" + b"0" * 400, b"-" + b"9" * 400])
async def test_huge_numbers_in_a_number_field_are_422(
    client: Client,
    redis: Redis,
    prefix: str,
    number: bytes,
) -> None:
    """A number a float cannot hold (1e400, 10**400 written out) in a number field is a 422
    at that path, not an infinity stored and delivered."""
    text = json.dumps(SAMPLE_DATA).encode().replace(b'"score": 62.5', b'"score": ' + number)
    status, answer = await check(client, redis, prefix, text)
    assert (status, answer and answer["path"]) == (422, "$.attempt.score")


@pytest.mark.parametrize("number", [b"1e400", b"1" + b"0" * 400, b"1e-400", b"-0", b"0.0000000000000000001"])
async def test_huge_numbers_elsewhere_get_documented_answers(
    client: Client,
    redis: Redis,
    prefix: str,
    number: bytes,
) -> None:
    """Extreme numbers in customAttributes (int | float | ...) and in unknown fields are
    accepted or 422 — never a server error."""
    for body in (sample_with(number), sample_with_unknown_field(number)):
        status, _ = await check(client, redis, prefix, body)
        assert status in (200, 202, 422)


@pytest.mark.parametrize(
    "bad",
    [b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"abc\x80", b"\xe2\x82"],
    ids=["ff-fe", "overlong", "surrogate", "above-max", "lone-continuation", "truncated"],
)
async def test_invalid_utf8_anywhere_is_400_and_quarantined(
    client: Client,
    redis: Redis,
    prefix: str,
    bad: bytes,
) -> None:
    """Invalid UTF-8 in a known string field or in an ignored field is 400 invalid_json
    (the body is forwarded byte for byte, so it must be valid), quarantined."""
    text = json.dumps(SAMPLE_DATA).encode()
    for body in (
        text.replace(b'"Ada Lovelace"', b'"Ada ' + bad + b'"'),
        sample_with_unknown_field(b'"' + bad + b'"'),
    ):
        status, answer = await check(client, redis, prefix, body)
        assert status == 400
        assert answer is not None
        assert answer["error"] == "invalid_json"


async def test_nul_bytes(client: Client, redis: Redis, prefix: str) -> None:
    """A raw NUL inside a string or after the document is invalid JSON (400, quarantined);
    an escaped ``\\u0000`` is a valid character and the event is accepted byte for byte."""
    text = json.dumps(SAMPLE_DATA).encode()
    status, _ = await check(client, redis, prefix, text.replace(b'"Ada Lovelace"', b'"Ada\x00Lovelace"'))
    assert status == 400
    status, _ = await check(client, redis, prefix, text + b"\x00")
    assert status == 400
    status, _ = await check(client, redis, prefix, b"\x00" * 64)
    assert status == 400
    escaped = text.replace(b'"att_d23f0824128b2f330c5c"', b'"att_\\u0000nul"')
    status, answer = await check(client, redis, prefix, escaped)
    assert status == 202
    assert answer is not None
    assert await redis.get(Keys(prefix).event(answer["event_id"])) == escaped


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "", "application/jsonx", "multipart/form-data"],
)
async def test_non_json_content_types_are_415_and_nothing_is_kept(
    client: Client,
    redis: Redis,
    prefix: str,
    content_type: str,
) -> None:
    """A non-JSON Content-Type is 415 whatever the body, and nothing is queued or kept."""
    body = json.dumps(SAMPLE_DATA).encode()
    status, _ = await check(client, redis, prefix, body, {**AUTH, "Content-Type": content_type})
    assert status == 415
    keys = Keys(prefix)
    assert await redis.zcard(keys.queue) == 0
    assert await redis.zcard(keys.rejected) == 0


# -- the endpoint: big and slow bodies over a raw socket --------------------------------

CHUNK = b" " * 65_536
TEN_MB = 10 * 1024 * 1024


async def _raw_request(client: Client, head: bytes, body_chunks: AsyncIterator[bytes]) -> int:
    """Send ``head`` then the body chunks over a raw socket while reading the answer;
    return the status (the server may answer and close before the body is all sent)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            async for chunk in body_chunks:
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(30):
            status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _spaces(total: int, chunked: bool) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        piece = CHUNK[: total - sent]
        sent += len(piece)
        yield (b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def _head(content_length: int | None) -> bytes:
    framing = "Transfer-Encoding: chunked" if content_length is None else f"Content-Length: {content_length}"
    return (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Authorization: {AUTH['Authorization']}\r\n{framing}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_ten_megabyte_body_is_413_without_reading_it_into_memory(
    client: Client,
    chunked: bool,
) -> None:
    """A 10 MB body (declared, or streamed chunked without a length) is answered 413, and
    the receiver's memory does not grow by anything like the body's size: the traced peak
    over three such requests stays under 4 MiB (the limit is 1 MiB)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(3):
            status = await _raw_request(client, _head(None if chunked else TEN_MB), _spaces(TEN_MB, chunked))
            assert status == 413
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before < 4 * 1024 * 1024, f"peak grew by {(peak - before) / 2**20:.1f} MiB"
    # the receiver still answers normally afterwards
    assert (await post(client, json.dumps(SAMPLE_DATA).encode())).status == 202


async def test_slow_body_does_not_block_other_requests(
    client: Client,
    redis: Redis,
    prefix: str,
) -> None:
    """A client dribbling its request a few bytes at a time does not hold up others: a
    normal request sent meanwhile gets its 202 within 2 s, while the slow one is still
    being sent; the slow one then completes with its own 202."""
    slow_doc = replaced(SAMPLE_DATA, ("attempt", "audit", "releasedAt"), "2026-12-01T00:00:00.000Z")
    slow_body = json.dumps(slow_doc).encode()
    started = asyncio.Event()
    others_done = asyncio.Event()
    dribbled = 0

    async def dribble() -> AsyncIterator[bytes]:
        nonlocal dribbled
        for i in range(0, len(slow_body), 4):
            if i == 64:
                started.set()
            if not others_done.is_set():
                dribbled = i
                await asyncio.sleep(0.01)  # pacing of the slow client, not a wait for an event
            yield slow_body[i : i + 4]

    slow = asyncio.create_task(_raw_request(client, _head(len(slow_body)), dribble()))
    await started.wait()
    async with asyncio.timeout(2):
        response = await post(client, json.dumps(SAMPLE_DATA).encode())
    assert response.status == 202
    assert not slow.done()
    assert dribbled < len(slow_body) - 4  # the slow body was still being sent
    others_done.set()
    assert await slow == 202
    assert await redis.zcard(Keys(prefix).queue) == 2


async def test_distinct_identities_never_collide(
    client: Client,
    redis: Redis,
    prefix: str,
) -> None:
    """Two events with different (meta.eventName, attempt.id) are two events, whatever
    characters the ids contain: both get 202 and are queued. (releasedAt must be a
    timestamp, so the separator-laden values go in the two ids.)"""
    name = SAMPLE_DATA["meta"]["eventName"]
    first = replaced(SAMPLE_DATA, ("meta", "eventName"), name + "\x1fatt_1")
    first = replaced(first, ("attempt", "id"), "att_2")
    second = replaced(SAMPLE_DATA, ("attempt", "id"), "att_1\x1fatt_2")
    assert (await check(client, redis, prefix, json.dumps(first).encode()))[0] == 202
    assert (await check(client, redis, prefix, json.dumps(second).encode()))[0] == 202
