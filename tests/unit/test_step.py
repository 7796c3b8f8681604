"""The step payload (encode/decode in one place), the shared padding arithmetic, and server sessions' apply()."""

import asyncio

import pytest
import torch

from petals_cli import transport
from petals_cli.errors import InvalidRequestError, SessionLengthError
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
