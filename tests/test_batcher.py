"""The server's micro-batcher on its own, with a stand-in model whose speed the test controls: requests that
arrive while the model is busy share the next call, a request is never split, a lone client does not wait, and a
full queue is refused."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pipeline.reward import Stats
from pipeline.serve import ApiError, MicroBatcher, ServeConfig


class SlowModel:
    """Scores each item by the size of the call it came in; the first call blocks until released."""

    def __init__(self):
        self.stats = Stats()
        self.calls: list[int] = []
        self.release = threading.Event()

    def score(self, items: list[dict]) -> list[dict]:
        if not self.calls:
            self.release.wait(10)
        self.calls.append(len(items))
        return [{"call_size": len(items), "id": item["id"]} for item in items]


def items(first: int, n: int) -> list[dict]:
    return [{"id": i} for i in range(first, first + n)]


def run(config: ServeConfig, scenario) -> SlowModel:
    model = SlowModel()

    async def main() -> None:
        batcher = MicroBatcher(model, config)
        batcher.start()
        try:
            await scenario(batcher, model)
        finally:
            model.release.set()
            await batcher.stop()

    asyncio.run(main())
    return model


def test_requests_queued_behind_a_busy_model_share_one_call_and_are_never_split():
    async def scenario(batcher: MicroBatcher, model: SlowModel) -> None:
        first = asyncio.create_task(batcher.submit(items(0, 1)))
        await asyncio.sleep(0.05)  # the model is busy with the first request
        rest = [asyncio.create_task(batcher.submit(items(10 * k, 3))) for k in range(1, 5)]  # 4 x 3 items
        await asyncio.sleep(0.05)
        model.release.set()
        assert [r["id"] for r in await first] == [0]
        answers = await asyncio.gather(*rest)
        for k, answer in enumerate(answers, 1):
            assert [r["id"] for r in answer] == list(range(10 * k, 10 * k + 3))  # each request gets its own, in order

    model = run(ServeConfig(max_batch=8, batch_wait_ms=0), scenario)
    assert model.calls == [1, 6, 6]  # 3 + 3 fit max_batch 8; the third request is carried, never split


def test_a_lone_client_does_not_wait_but_a_busy_server_gathers():
    async def scenario(batcher: MicroBatcher, model: SlowModel) -> None:
        model.release.set()
        start = time.perf_counter()
        await batcher.submit(items(0, 1))
        assert time.perf_counter() - start < 0.5  # batch_wait_ms is 2 s: a lone request does not pay it
        await asyncio.gather(*(batcher.submit(items(k, 1)) for k in range(1, 4)))  # together: one call
        start = time.perf_counter()
        await asyncio.gather(batcher.submit(items(10, 1)), _later(batcher.submit(items(11, 1)), 0.2))
        assert time.perf_counter() - start >= 0.2  # the last batch had company: the wait gathers the latecomer

    model = run(ServeConfig(max_batch=8, batch_wait_ms=2000), scenario)
    assert model.calls == [1, 3, 2]


async def _later(awaitable, seconds: float):
    await asyncio.sleep(seconds)
    return await awaitable


def test_a_full_queue_is_refused_with_retry_after():
    async def scenario(batcher: MicroBatcher, model: SlowModel) -> None:
        busy = asyncio.create_task(batcher.submit(items(0, 4)))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(batcher.submit(items(4, 4)))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as refused:
            await batcher.submit(items(8, 3))  # 4 waiting + 3 > max_queue 6
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
        model.release.set()
        await asyncio.gather(busy, queued)
        assert len(await batcher.submit(items(8, 3))) == 3  # room again

    run(ServeConfig(max_batch=4, max_queue=6, batch_wait_ms=0), scenario)
