"""The step engine: its grouping and fairness decisions (pure), and batched steps equal to the same steps alone."""

import asyncio
import time

import pytest
import torch

from petals_cli.checkpoint import resolve_model
from petals_cli.server.blocks import load_span, read_model_config
from petals_cli.server.compute import SpanCompute
from petals_cli.server.engine import StepEngine, StepJob, plan
from petals_cli.server.graphs import KeptGraphs
from petals_cli.server.sessions import ServerSession
from petals_cli.step import Step
from petals_cli.testing import make_tiny_model
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest


def job(session, peer="a", blocks=(0, 4), adapter="", batchable=True):
    return StepJob(session, peer, blocks, adapter, torch.zeros(1, 1, 8), None, batchable=batchable)


def names(groups):
    return [[item.session for item in group] for group in groups]


def test_one_token_steps_of_the_same_blocks_and_adapter_share_a_batch_and_others_run_alone():
    jobs = [
        job("s1"),
        job("prefill", batchable=False),
        job("s2", peer="b"),
        job("other-blocks", blocks=(4, 8)),
        job("lora", adapter="lora"),
        job("s3", peer="c"),
    ]
    groups, waiting = plan(jobs)
    assert names(groups) == [["s1", "s2", "s3"], ["prefill"], ["other-blocks"], ["lora"]]
    assert waiting == []


def test_a_batch_takes_every_peer_in_turn_and_what_does_not_fit_waits_first_in_line():
    jobs = [job(f"a{index}", peer="a") for index in range(6)] + [job("b0", peer="b"), job("c0", peer="c")]
    groups, waiting = plan(jobs, max_batch=4)
    assert names(groups) == [["a0", "b0", "c0", "a1"]]  # one flooding peer does not crowd out the others
    assert [item.session for item in waiting] == ["a2", "a3", "a4", "a5"]
    groups, waiting = plan([*waiting, job("b1", peer="b")], max_batch=4)
    assert names(groups) == [["a2", "b1", "a3", "a4"]] and [item.session for item in waiting] == ["a5"]


def test_the_engine_batches_steps_that_wait_together_and_fails_only_the_failing_group():
    calls = []

    def run_group(group):
        calls.append([item.session for item in group])
        if any(item.session == "bad" for item in group):
            raise RuntimeError("boom")
        return [item.hidden + len(group) for item in group]

    async def main():
        engine = StepEngine(run_group)
        try:
            first = asyncio.ensure_future(engine.submit(job("first")))
            await asyncio.sleep(0.05)  # computing: the next three wait together
            rest = [asyncio.ensure_future(engine.submit(job(name, peer=name))) for name in ("x", "y", "z")]
            outputs = await asyncio.gather(first, *rest)
            bad = await asyncio.gather(engine.submit(job("bad", batchable=False)), return_exceptions=True)
            return outputs, bad, engine.stats
        finally:
            engine.shutdown()

    outputs, bad, stats = asyncio.run(main())
    assert calls[:2] == [["first"], ["x", "y", "z"]]
    assert [float(output.sum()) for output in outputs] == [8.0, 24.0, 24.0, 24.0]
    assert isinstance(bad[0], RuntimeError)
    assert (stats.batches, stats.batched_steps, stats.largest_batch) == (1, 3, 3)


def test_the_recent_step_time_averages_one_token_steps_and_leaves_prompts_out():
    def run_group(group):
        time.sleep(0.2 if group[0].hidden.shape[1] > 1 else 0.02)
        return [item.hidden for item in group]

    async def main():
        engine = StepEngine(run_group)
        try:
            await engine.submit(job("decode"))
            first = engine.stats.step_seconds
            prompt = StepJob("prompt", "a", (0, 4), "", torch.zeros(1, 5, 8), None)
            await engine.submit(prompt)
            return first, engine.stats.step_seconds
        finally:
            engine.shutdown()

    first, after_prompt = asyncio.run(main())
    assert 0.02 <= first < 0.2 and after_prompt == first


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("engine") / "tiny", "llama", num_layers=4)
    source = resolve_model(str(path))
    return load_span(source, read_model_config(source), 1, 4, device="cpu", dtype=torch.float32)


def test_a_batched_step_of_sessions_at_different_lengths_with_padding_equals_each_step_alone(span):
    torch.manual_seed(0)
    hidden = span.config.hidden_size
    prefills = [torch.randn(1, 5, hidden), torch.randn(2, 9, hidden), torch.randn(1, 2, hidden)]
    masks = [None, torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]), None]  # the second is a padded batch
    alone_caches, batch_caches, expected = [], [], []
    steps = [torch.randn(prefill.shape[0], 1, hidden) for prefill in prefills]
    with torch.inference_mode():
        for prefill, mask, step in zip(prefills, masks, steps, strict=True):
            outputs = []
            for caches in (alone_caches, batch_caches):
                cache = span.make_cache(1, 4, capacity=16)
                assert span.can_batch(cache) or not caches
                span(prefill, 1, 4, cache, attention_mask=mask, position_ids=_positions(mask, 0, 9))
                caches.append(cache)
            full = None if mask is None else torch.nn.functional.pad(mask, (0, 1), value=1)
            outputs.append(
                span(step, 1, 4, alone_caches[-1], attention_mask=full, position_ids=_positions(full, 9, 10))
            )
            expected.append(outputs[0])
        fulls = [None if mask is None else torch.nn.functional.pad(mask, (0, 1), value=1) for mask in masks]
        positions = [None if full is None else _positions(full, 9, 10) for full in fulls]
        batched = span.forward_batched(steps, 1, 4, batch_caches, fulls, positions)
    for output, reference in zip(batched, expected, strict=True):
        # float32 rounding of differently shaped products: the tiny model's activations reach the hundreds
        assert float((output - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    # the caches went on as they would have alone
    assert [cache.get_seq_length() for cache in batch_caches] == [cache.get_seq_length() for cache in alone_caches]


def _positions(mask, start, end):
    if mask is None:
        return None
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, start:end]


def test_a_long_prompt_runs_in_chunks_with_other_sessions_steps_between_and_training_waits_its_turn():
    calls, late = [], []

    def run_group(group):
        calls.append([(item.session, item.hidden.shape[1]) for item in group])
        if group[0].session == "prompt" and not late:  # a step arrives while the prompt's first chunk computes
            late.append(asyncio.run_coroutine_threadsafe(engine.submit(job("late", peer="c")), loop))
        return [item.hidden * 2 for item in group]

    def training():
        calls.append([("training", 0)])
        return "trained"

    async def main():
        nonlocal engine, loop
        engine, loop = StepEngine(run_group, prefill_chunk=4), asyncio.get_running_loop()
        try:
            prompt = job("prompt", batchable=False)
            prompt.hidden, prompt.chunkable = torch.arange(10.0).reshape(1, 10, 1), True
            first = asyncio.ensure_future(engine.submit(prompt))
            trained = asyncio.ensure_future(engine.run(training))
            decode = asyncio.ensure_future(engine.submit(job("decode", peer="b")))
            results = await asyncio.gather(first, trained, decode)
            await asyncio.wrap_future(late[0])
            return results
        finally:
            engine.shutdown()

    engine = loop = None
    prompt_output, trained, _ = asyncio.run(main())
    # one-token steps first; the prompt's 10 tokens in chunks of 4, 4, 2 with the step that came meanwhile
    # between them; training after the steps that were waiting
    assert calls == [
        [("decode", 1)],
        [("prompt", 4)],
        [("late", 1)],
        [("prompt", 4)],
        [("prompt", 2)],
        [("training", 0)],
    ]
    assert prompt_output.flatten().tolist() == [2.0 * value for value in range(10)] and trained == "trained"


def test_a_prompt_computed_in_chunks_through_the_cache_equals_it_computed_at_once(span):
    torch.manual_seed(1)
    prompt = torch.randn(2, 11, span.config.hidden_size)
    mask = torch.tensor([[0, 0, 0] + [1] * 8, [1] * 11])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        whole = span(prompt, 1, 4, span.make_cache(1, 4, capacity=16), attention_mask=mask, position_ids=positions)
        step = StepJob("s", "a", (1, 4), "", prompt, span.make_cache(1, 4, capacity=16), mask, positions)
        parts = [
            span(part.hidden, 1, 4, part.cache, attention_mask=part.attention_mask, position_ids=part.position_ids)
            for part in step.chunks(4)
        ]
    chunked = torch.cat(parts, dim=1)
    assert float((chunked - whole).abs().max()) <= 1e-5 * float(whole.abs().max())


def test_a_session_rewound_to_an_earlier_position_computes_exactly_what_a_fresh_one_does(span):
    """Speculative decoding: 6 tokens, back to 4, 3 others; as if the session had only ever seen 4 and those 3."""
    torch.manual_seed(2)
    hidden = span.config.hidden_size
    prompt, new, token = torch.randn(2, 6, hidden), torch.randn(2, 3, hidden), torch.randn(2, 1, hidden)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])  # a left-padded row
    request = SpanRequest(PROTOCOL_VERSION, "m", 1, 4, max_length=16, batch_size=2)
    rewound, fresh, other = (ServerSession(name * 32, request, span.make_cache(1, 4, capacity=16)) for name in "rfo")
    for session in (rewound, fresh, other):
        session.batchable = span.can_batch(session.cache)
    compute = SpanCompute(span, KeptGraphs())

    async def alone(job):
        return compute.run_group([job])[0]

    async def batched(job):  # in one batch with another session's one-token step
        return compute.run_group([job, other.job(Step(other.position, token), others_open=True)])[0]

    async def main():
        await rewound.apply(Step(0, prompt, attention_mask=mask), alone, others_open=False)
        await other.apply(Step(0, prompt[:, :2]), alone, others_open=False)
        output = await rewound.apply(Step(4, new, rewind=True), alone, others_open=False)
        await fresh.apply(Step(0, prompt[:, :4], attention_mask=mask[:, :4]), alone, others_open=False)
        expected = await fresh.apply(Step(4, new), alone, others_open=False)
        # a rewound one-token step may join a batch, which sees the cache's rewound length
        step = Step(6, token, rewind=True)
        assert rewound.job(step, others_open=True).batchable
        one_batched = await rewound.apply(step, batched, others_open=True)
        return output, expected, one_batched, await fresh.apply(step, alone, others_open=True)

    with torch.inference_mode():
        output, expected, one_batched, one_alone = asyncio.run(main())
    assert torch.equal(output, expected)
    assert rewound.position == fresh.position == rewound.cache.get_seq_length() == 7
    assert float((one_batched - one_alone).abs().max()) <= 1e-5 * float(one_alone.abs().max())


def test_a_step_of_a_session_opened_before_a_move_fails_instead_of_running_on_the_new_blocks(span, tmp_path):
    """A server moving from blocks 1:4 to 0:3 while a session of 1:4 has a step queued: the step must not run on
    the new span (its layers 1:3 with a cache made for 1:4, or a shorter slice of them), it fails and the client
    opens a new session; a request for blocks the new span lacks is refused, not computed short."""
    from petals_cli.errors import BlocksNotHeldError, ServerError

    source = resolve_model(str(make_tiny_model(tmp_path / "tiny", "llama", num_layers=4)))
    moved_to = load_span(source, read_model_config(source), 0, 3, device="cpu", dtype=torch.float32)
    hidden = torch.randn(1, 3, span.config.hidden_size)
    request = SpanRequest(PROTOCOL_VERSION, "m", 1, 4, max_length=16)
    session = ServerSession("s" * 32, request, span.make_cache(1, 4, capacity=16), span=span)
    compute = SpanCompute(span, KeptGraphs())

    async def run(job):
        return compute.run_group([job])[0]

    with torch.inference_mode():
        asyncio.run(session.apply(Step(0, hidden), run, others_open=False))
        queued = session.job(Step(3, hidden[:, :1]), others_open=False)
        compute.replace(moved_to)
        with pytest.raises(ServerError, match="moved to other blocks"):
            compute.run_group([queued])
        with pytest.raises(BlocksNotHeldError, match="not in this server.s 0:3"):
            moved_to(hidden, 1, 4)
        # a session opened on the new blocks runs there
        fresh = ServerSession("f" * 32, SpanRequest(PROTOCOL_VERSION, "m", 1, 3, max_length=16),
                              moved_to.make_cache(1, 3, capacity=16), span=moved_to)  # fmt: skip
        output = asyncio.run(fresh.apply(Step(0, hidden), run, others_open=False))
    assert torch.equal(output, moved_to(hidden, 1, 3))
