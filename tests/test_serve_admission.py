"""The scheduler's admission (issue 28 item 6): requests of one burst are prefilled in one
forward. A request still on its way (:meth:`Scheduler.incoming`) holds the admission of those
already queued, up to one step's time; a lone request starts after the quiet spell; and the
tokens of rows gathered into one batch are those of the rows run one at a time."""

from __future__ import annotations

import asyncio
import time

import torch

from llamascope_sdk.serve.scheduler import Job, Scheduler
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row


def _alone(model, tok, ids: list[int], n: int) -> list[int]:
    gen = BatchGenerator(model, tok)
    gen.add(Row(ids, max_new_tokens=n, stop_ids=()))
    out: list[int] = []
    while gen.busy:
        out += [t.token for t in gen.step() if t.token is not None]
    return out


async def _tokens(job: Job) -> list[int]:
    out: list[int] = []
    while (item := await job.events.get()) is not None:
        assert not isinstance(item, BaseException), item
        if item.token is not None:
            out.append(item.token)
    return out


def test_a_request_on_its_way_is_gathered_into_the_same_prefill(tiny_llama, char_tokenizer) -> None:
    prompts = [[1, 5, 6, 7], [1, 9, 3]]
    want = [_alone(tiny_llama, char_tokenizer, p, 5) for p in prompts]
    sched = Scheduler(tiny_llama, char_tokenizer, max_batch=4, batch_wait=0.01, gather_max=30)
    sched.step_s = 20.0  # as if a step took 20 s: the first request may wait up to that

    async def run() -> tuple[list[list[int]], float]:
        loop = asyncio.get_running_loop()
        jobs = [Job([Row(p, max_new_tokens=5, stop_ids=())], loop) for p in prompts]
        with sched.incoming():  # the second request is being read
            sched.submit(jobs[0])
            await asyncio.sleep(0.5)
            held = sched.load  # the first waits for it
            assert (held["waiting"], held["rows"]) == (1, 0), held
            sched.submit(jobs[1])
        t0 = time.monotonic()
        got = await asyncio.gather(*(_tokens(j) for j in jobs))
        return list(got), time.monotonic() - t0

    try:
        got, took = asyncio.run(run())
    finally:
        sched.stop(60)
    assert got == want
    assert sched.max_rows_seen == 2  # one prefill of both rows
    assert sched.steps == 5  # 1 prefill + 4 decode steps: no forward of one row alone
    assert took < 15  # admitted once nothing was on its way, not after the longest wait


def test_a_lone_request_waits_only_the_quiet_spell_and_the_longest_wait_is_bounded(
        tiny_llama, char_tokenizer) -> None:
    sched = Scheduler(tiny_llama, char_tokenizer, max_batch=4, batch_wait=0.01, gather_max=0.3)
    sched.step_s = 5.0  # longest wait min(0.3, 5) = 0.3 s; quiet spell min(0.3, 5 / 8) = 0.3 s

    async def one(incoming: bool) -> float:
        loop = asyncio.get_running_loop()
        job = Job([Row([1, 4, 4], max_new_tokens=1, stop_ids=())], loop)
        t0 = time.monotonic()
        if incoming:
            with sched.incoming():  # a request that never arrives: the longest wait ends it
                with sched.incoming():
                    sched.submit(job)
                assert await _tokens(job)
        else:
            sched.submit(job)
            assert await _tokens(job)
        return time.monotonic() - t0

    try:
        waited = asyncio.run(one(incoming=True))
        sched.step_s, sched.gather_max = 0.0, 30.0  # now: quiet spell = batch_wait = 0.01 s
        lone = asyncio.run(one(incoming=False))
    finally:
        sched.stop(60)
    assert 0.3 <= waited < 10
    assert lone < 0.25


def test_gathered_rows_keep_their_tokens_with_edits(tiny_llama, char_tokenizer) -> None:
    """Rows admitted together with others (after a wait) give the tokens they give alone,
    with a steering vector on one of them."""
    from llamascope_sdk.core.sites import Site
    from llamascope_sdk.steering.row_edits import VectorEdit

    torch.manual_seed(1)
    edit = VectorEdit(torch.randn(64) * 4, Site(1, "resid_post"))
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 3]]
    edits = [[edit], [], [edit]]
    want = []
    for p, e in zip(prompts, edits, strict=True):
        gen = BatchGenerator(tiny_llama, char_tokenizer)
        gen.add(Row(p, e, max_new_tokens=6, stop_ids=()))
        toks: list[int] = []
        while gen.busy:
            toks += [t.token for t in gen.step() if t.token is not None]
        want.append(toks)
    sched = Scheduler(tiny_llama, char_tokenizer, max_batch=4, batch_wait=0.2)

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        jobs = [Job([Row(p, e, max_new_tokens=6, stop_ids=())], loop)
                for p, e in zip(prompts, edits, strict=True)]
        for j in jobs:
            sched.submit(j)
        return list(await asyncio.gather(*(_tokens(j) for j in jobs)))

    try:
        got = asyncio.run(run())
    finally:
        sched.stop(60)
    assert got == want
    assert sched.max_rows_seen == 3
    assert want[0] != want[1]


def test_the_step_time_counts_decode_steps_only(tiny_llama, char_tokenizer) -> None:
    """A prefill (a long prompt's, a loglikelihood request's) leaves the step time that sizes
    the quiet spell as it was; decode steps set it."""
    sched = Scheduler(tiny_llama, char_tokenizer, max_batch=4, batch_wait=0.001, gather_max=5)

    async def run(n: int) -> list[int]:
        job = Job([Row([1, 5, 6, 7], max_new_tokens=n, stop_ids=())], asyncio.get_running_loop())
        sched.submit(job)
        return await _tokens(job)

    try:
        assert len(asyncio.run(run(1))) == 1  # one step, a prefill: no decode step timed
        assert (sched.steps, sched.step_s) == (1, 0.0)
        assert len(asyncio.run(run(3))) == 3  # a prefill and two decode steps
        assert sched.steps == 4 and sched.step_s > 0
    finally:
        sched.stop(60)
