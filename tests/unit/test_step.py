"""The step payload (encode/decode in one place), the shared padding arithmetic, and server sessions' apply()."""

import asyncio

import msgpack
import pytest
import torch
from transformers import LlamaConfig, MistralConfig
from transformers.cache_utils import DynamicLayer

from petals_cli import transport
from petals_cli.errors import InvalidRequestError, SessionLengthError
from petals_cli.families import kv_cache
from petals_cli.families.kv_cache import PreallocatedLayer, SpanCache, preallocate
from petals_cli.server.sessions import ServerSession
from petals_cli.step import Step, extend_mask, positions_from_mask
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest, StepRequest


def _request(**fields) -> SpanRequest:
    defaults = dict(protocol=PROTOCOL_VERSION, prefix="m", start_block=0, end_block=2, max_length=16, batch_size=2)
    return SpanRequest(**{**defaults, **fields})


def test_a_step_survives_its_message_with_every_field():
    step = Step(
        position=3,
        hidden=torch.randn(2, 2, 8),
        attention_mask=torch.tensor([[1, 1], [0, 1]]),
        position_ids=torch.tensor([[3, 4], [0, 1]]),
        prompts=torch.randn(2, 5, 8),
    )
    decoded = Step.from_message(step.to_message())
    assert decoded.position == 3
    for name in ("hidden", "attention_mask", "position_ids", "prompts"):
        assert torch.equal(getattr(decoded, name), getattr(step, name)), name
    plain = Step.from_message(Step(0, torch.randn(1, 4, 8)).to_message())
    assert plain.attention_mask is None and plain.position_ids is None and plain.prompts is None


@pytest.mark.parametrize(
    ("names", "prompts", "tensors", "problem"),
    [
        ((), False, 2, "carries 1 tensors, got 2"),
        (("attention_mask",), True, 2, "carries 3 tensors, got 2"),
        (("secret",), False, 2, "unexpected extra tensor 'secret'"),
        (("position_ids", "position_ids"), False, 3, "unexpected extra tensor"),
    ],
)
def test_a_message_whose_tensors_do_not_match_its_metadata_is_refused(names, prompts, tensors, problem):
    meta = transport.pack(StepRequest(position=0, extra_tensors=names, prompts=prompts))
    message = transport.step_request([torch.zeros(1, 1, 8)] * tensors, meta)
    with pytest.raises(InvalidRequestError, match=problem):
        Step.from_message(message)


def test_the_mask_grows_as_the_client_and_the_server_both_need():
    assert extend_mask(None, 3, None, 2, 1) is None  # never padded
    mask = extend_mask(None, 2, torch.tensor([[0, 1], [1, 1]]), 2, 2)
    assert mask.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]
    mask = extend_mask(mask, 4, None, 2, 1)  # once padded, later steps extend it with ones
    assert mask.tolist() == [[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]
    left_padded = torch.tensor([[0, 0, 1, 1, 1]])
    assert positions_from_mask(left_padded, 5).tolist() == [[0, 0, 0, 1, 2]]
    assert positions_from_mask(left_padded, 1).tolist() == [[2]]


def test_a_session_refuses_steps_that_do_not_fit_it_and_changes_nothing():
    session = ServerSession("s", _request(), cache=None)
    with pytest.raises(InvalidRequestError, match="step at position 1, session is at 0"):
        session.job(Step(1, torch.zeros(2, 1, 8)), others_open=False)
    with pytest.raises(SessionLengthError, match="would reach 17 tokens"):
        session.job(Step(0, torch.zeros(2, 17, 8)), others_open=False)
    assert session.position == 0 and not session.broken


def test_a_session_applies_a_step_and_remembers_its_padding():
    session = ServerSession("s", _request(), cache=None, batchable=True)
    seen = []

    async def run(job):
        seen.append(job)
        return job.hidden + 1

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    output = asyncio.run(session.apply(Step(0, torch.zeros(2, 3, 8), attention_mask=mask), run, others_open=True))
    assert torch.equal(output, torch.ones(2, 3, 8)) and session.position == 3
    prompt = seen[0]
    assert prompt.position_ids.tolist() == [[0, 0, 1], [0, 1, 2]]  # derived from the mask, as the client does
    assert prompt.chunkable and not prompt.batchable  # a prompt while other sessions are open: cut into chunks
    asyncio.run(session.apply(Step(3, torch.zeros(2, 1, 8)), run, others_open=True))
    step = seen[1]
    assert step.batchable and step.attention_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert step.position_ids.tolist() == [[2], [3]] and session.position == 4


def test_only_the_part_of_the_deep_prompts_a_step_covers_is_used_and_such_steps_run_alone():
    session = ServerSession("s", _request(batch_size=1), cache=None, batchable=True)
    prompts = torch.randn(2, 3, 8)
    inside = session.job(Step(0, torch.zeros(1, 2, 8), prompts=prompts), others_open=True)
    assert torch.equal(inside.prompts, prompts) and not inside.chunkable
    session.position = 2
    last = session.job(Step(2, torch.zeros(1, 1, 8), prompts=prompts), others_open=True)
    assert torch.equal(last.prompts, prompts[:, 2:]) and not last.batchable
    session.position = 3
    beyond = session.job(Step(3, torch.zeros(1, 1, 8), prompts=prompts), others_open=True)
    assert beyond.prompts is None and beyond.batchable


def test_a_step_that_fails_in_compute_breaks_its_session():
    session = ServerSession("s", _request(), cache=None)

    async def run(job):
        raise RuntimeError("out of luck")

    with pytest.raises(RuntimeError):
        asyncio.run(session.apply(Step(0, torch.zeros(2, 1, 8)), run, others_open=False))
    assert session.broken and session.position == 0


def test_a_pushed_step_carries_its_hops_and_the_next_one_gets_the_rest():
    hops = (("peerB", "b" * 32), ("peerC", "c" * 32))
    step = Step(5, torch.randn(1, 1, 8), attention_mask=torch.ones(1, 1, dtype=torch.long), next_hops=hops)
    decoded = Step.from_message(step.to_message())
    assert decoded.next_hops == hops and decoded.session_id == ""
    output = torch.randn(1, 1, 8)
    onward = Step.from_message(decoded.pushed_on(output).to_message())
    assert onward.session_id == "b" * 32 and onward.next_hops == hops[1:] and onward.position == 5
    assert torch.equal(onward.hidden, output) and torch.equal(onward.attention_mask, step.attention_mask)


def test_hops_without_as_many_sessions_are_refused():
    meta = transport.pack(StepRequest(position=0, next_peers=("a", "b"), next_sessions=("x",)))
    with pytest.raises(InvalidRequestError, match="as many sessions as peers"):
        Step.from_message(transport.step_request([torch.zeros(1, 1, 8)], meta))


def test_a_rewinding_step_survives_its_message_and_its_push_and_older_messages_do_not_rewind():
    step = Step(4, torch.randn(1, 2, 8), rewind=True, next_hops=(("peerB", "b" * 32),))
    decoded = Step.from_message(step.to_message())
    assert decoded.rewind and decoded.position == 4
    assert decoded.pushed_on(torch.randn(1, 2, 8)).rewind
    assert not Step.from_message(Step(4, torch.randn(1, 2, 8)).to_message()).rewind
    older = transport.step_request([torch.zeros(1, 1, 8)], msgpack.packb({"position": 2}))  # a client before rewind
    assert not Step.from_message(older).rewind
    hostile = transport.step_request([torch.zeros(1, 1, 8)], msgpack.packb({"position": 2, "rewind": 1}))
    with pytest.raises(InvalidRequestError, match="'rewind' must be bool"):
        Step.from_message(hostile)


def _cache(config_class=LlamaConfig, **fields) -> SpanCache:
    """A session's cache of two blocks (one head of 8 values), as ``SpanRunner.make_cache`` builds it."""
    sizes = dict(hidden_size=8, num_attention_heads=1, num_key_value_heads=1, intermediate_size=8, head_dim=8)
    return preallocate(SpanCache(config_class(num_hidden_layers=2, **sizes, **fields)), capacity=16)


async def _compute(job):
    """Stands in for the blocks: each one caches the step's hidden states (shifted by its index) as keys/values."""
    states = job.hidden[:, None]
    for index in range(len(job.cache.layers)):
        job.cache.update(states + index, states - index, index)
    return job.hidden + 1


def _state(session: ServerSession) -> tuple:
    """What a step may change: the position, whether the session broke, its mask and every cached key and value."""
    tensors = [
        session.attention_mask,
        *(part for layer in session.cache.layers for part in (layer.keys, layer.values)),
    ]
    return session.position, session.broken, [None if part is None else part.clone() for part in tensors]


def _same_state(session: ServerSession, state: tuple) -> bool:
    position, broken, tensors = _state(session)
    return (position, broken) == state[:2] and all(
        (ours is None and kept is None) or (ours is not None and kept is not None and torch.equal(ours, kept))
        for ours, kept in zip(tensors, state[2], strict=True)
    )


def test_a_rewinding_step_cuts_the_session_back_as_if_it_had_only_seen_the_tokens_before():
    torch.manual_seed(0)
    prompt, new = torch.randn(2, 6, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    rewound, fresh = (ServerSession(name, _request(), cache=_cache(), batchable=True) for name in "rf")
    jobs = []

    async def run(job):
        jobs.append(job)
        return await _compute(job)

    asyncio.run(rewound.apply(Step(0, prompt, attention_mask=mask), _compute, others_open=False))
    output = asyncio.run(rewound.apply(Step(4, new, rewind=True), run, others_open=False))
    asyncio.run(fresh.apply(Step(0, prompt[:, :4], attention_mask=mask[:, :4]), _compute, others_open=False))
    expected = asyncio.run(fresh.apply(Step(4, new), run, others_open=False))

    assert torch.equal(output, expected) and rewound.position == fresh.position == 7
    assert rewound.cache.get_seq_length() == 7 and rewound.attention_mask.tolist() == fresh.attention_mask.tolist()
    assert jobs[0].position_ids.tolist() == jobs[1].position_ids.tolist() == [[3, 4, 5], [4, 5, 6]]
    for ours, theirs in zip(rewound.cache.layers, fresh.cache.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours._key_buffer.shape[-2] == 16 and ours.keys.data_ptr() == ours._key_buffer.data_ptr()
    # a rewound one-token step batches like any other, and building its job changes nothing
    state = _state(rewound)
    one = rewound.job(Step(5, torch.randn(2, 1, 8), rewind=True), others_open=True)
    assert one.batchable and one.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1] * 6]
    assert _same_state(rewound, state)
    # rewinding to where the session already is, or to its start, is a rewind too
    asyncio.run(rewound.apply(Step(7, new[:, :1], rewind=True), _compute, others_open=False))
    asyncio.run(rewound.apply(Step(0, new, rewind=True), _compute, others_open=False))
    assert rewound.position == rewound.cache.get_seq_length() == 3 and rewound.attention_mask.shape == (2, 3)
    assert torch.equal(rewound.cache.layers[1].keys, new[:, None] + 1)


@pytest.mark.parametrize(
    ("position", "rewind", "tokens", "error", "problem"),
    [
        (7, True, 1, InvalidRequestError, "step at position 7, session is at 6 .*0..6 with rewind"),
        (-1, True, 1, InvalidRequestError, "step at position -1, session is at 6"),
        (4, False, 1, InvalidRequestError, "step at position 4, session is at 6 .*6 without rewind"),
        (4, True, 13, SessionLengthError, "would reach 17 tokens, max_length is 16"),
    ],
)
def test_a_rewind_that_does_not_fit_the_session_is_refused_and_changes_nothing(
    position, rewind, tokens, error, problem
):
    session = ServerSession("s", _request(), cache=_cache(), batchable=True)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    asyncio.run(session.apply(Step(0, torch.randn(2, 6, 8), attention_mask=mask), _compute, others_open=False))
    state = _state(session)

    async def run(job):
        raise AssertionError("a refused step must not reach compute")

    with pytest.raises(error, match=problem):
        asyncio.run(session.apply(Step(position, torch.randn(2, tokens, 8), rewind=rewind), run, others_open=False))
    assert _same_state(session, state)


def test_a_cache_that_dropped_what_a_rewind_needs_refuses_it_and_changes_nothing():
    session = ServerSession("s", _request(), cache=_cache(MistralConfig, sliding_window=4))
    asyncio.run(session.apply(Step(0, torch.randn(2, 3, 8)), _compute, others_open=False))
    asyncio.run(session.apply(Step(1, torch.randn(2, 2, 8), rewind=True), _compute, others_open=False))
    assert session.position == session.cache.get_seq_length() == 3  # within its window: like any cache
    asyncio.run(session.apply(Step(3, torch.randn(2, 2, 8)), _compute, others_open=False))
    state = _state(session)
    with pytest.raises(InvalidRequestError, match="cannot be rewound from position 5 to 4"):
        asyncio.run(session.apply(Step(4, torch.randn(2, 1, 8), rewind=True), _compute, others_open=False))
    assert _same_state(session, state)
    unknown = ServerSession("u", _request(), cache=None, position=2)
    with pytest.raises(InvalidRequestError, match="cannot be rewound"):
        unknown.job(Step(1, torch.randn(2, 1, 8), rewind=True), others_open=False)


def test_a_preallocated_cache_cut_back_then_appended_holds_what_a_growing_cache_does():
    keys, values = torch.randn(3, 1, 11, 8), torch.randn(3, 1, 11, 8)
    growing, preallocated = _cache(), _cache()
    growing.layers = [DynamicLayer() for _ in growing.layers]
    assert all(type(layer) is PreallocatedLayer for layer in preallocated.layers)
    for cache in (growing, preallocated):
        for index in range(2):
            cache.update(keys[:, :, :6], values[:, :, :6], index)
        assert kv_cache.can_rewind(cache, 4) and not kv_cache.can_rewind(cache, 7)
        assert not kv_cache.can_rewind(cache, -1)
        kv_cache.rewind(cache, 4)
        assert cache.get_seq_length() == 4
        for index in range(2):
            cache.update(keys[:, :, 6:9], values[:, :, 6:9], index)
        kv_cache.rewind(cache, 0)
        assert cache.get_seq_length() == 0
        for index in range(2):
            cache.update(keys[:, :, 9:], values[:, :, 9:], index)
    buffers = [layer._key_buffer for layer in preallocated.layers]
    for ours, theirs in zip(preallocated.layers, growing.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == 2 and ours._key_buffer.shape[-2] == 16
    kv_cache.rewind(preallocated, 1)
    for index in range(2):
        preallocated.update(keys[:, :, :4], values[:, :, :4], index)
    # written in place, never reallocated
    assert all(layer._key_buffer is buffer for layer, buffer in zip(preallocated.layers, buffers, strict=True))
    expected = torch.cat([keys[:, :, 9:10], keys[:, :, :4]], dim=-2)
    assert all(torch.equal(layer.keys, expected) for layer in preallocated.layers)
