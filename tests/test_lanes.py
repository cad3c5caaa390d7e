"""Lanes (worker/lanes.py): each integration's share of a worker process."""

from __future__ import annotations

import asyncio

from worker.lanes import Lane


async def test_at_most_capacity_at_once_granted_in_arrival_order() -> None:
    """A lane grants at most `capacity` slots at once; the others wait and get theirs in the
    order they came as slots are given back."""
    lane = Lane("mail", 2)
    loop = asyncio.get_running_loop()
    assert await lane.acquire(loop.time() + 1) and await lane.acquire(loop.time() + 1)
    assert lane.full
    order: list[int] = []

    async def wait(n: int) -> None:
        assert await lane.acquire(loop.time() + 5)
        order.append(n)

    waiters = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert lane.waiting == 3
    for _ in range(3):
        lane.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    assert lane.busy == 2


async def test_a_wait_that_runs_out_gets_no_slot_and_leaves_none_taken() -> None:
    """acquire() gives up at its deadline with False, and the slot count is as before."""
    lane = Lane("mail", 1)
    loop = asyncio.get_running_loop()
    assert await lane.acquire(loop.time() + 1)
    assert not await lane.acquire(loop.time() + 0.01)
    assert lane.waiting == 0 and lane.busy == 1
    lane.release()
    assert lane.busy == 0 and not lane.full


async def test_the_wait_estimate_follows_what_sends_take() -> None:
    """A free lane promises no wait; a full one estimates from measured send durations, and
    from the oldest send in flight when that is slower (a destination slowing down now)."""
    lane = Lane("mail", 2)
    loop = asyncio.get_running_loop()
    assert lane.expected_wait() == 0
    lane.observe(0.3)
    await lane.acquire(loop.time() + 1)
    await lane.acquire(loop.time() + 1)
    assert abs(lane.expected_wait() - 0.15) < 0.01  # 1 waiting-to-be / 2 slots x 0.3 s
    lane.seconds_per_send = 0.001
    await asyncio.sleep(0.05)
    assert lane.expected_wait() >= 0.025  # the sends in flight are already older than that


async def test_work_handed_on_is_booked_one_batch_after_another() -> None:
    """Handing pairs on books the lane's time: each later batch is due after the earlier ones
    (so handed-on jobs come due as the lane should have room, not all at once)."""
    lane = Lane("mail", 2)
    lane.observe(0.2)
    first = lane.book(8)
    second = lane.book(8)
    assert first == 0
    assert abs(second - 0.8) < 0.05  # 8 sends x 0.2 s / 2 slots
