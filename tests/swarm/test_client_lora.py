"""Issue 20 over a real server: LoRA weights a client sends with its requests, against local transformers + peft.

One server holds both blocks of a tiny llama. Raw RPCs send A and B of q_proj and v_proj for every block; the
forward equals the peft model, the backward returns the gradients of the hidden states and of every A and B that
local autograd gives, a request without LoRA right after gets the base model, an inference session opened with the
weights steps exactly like the forward (also while a plain session steps beside it), and bad weights are refused.
"""

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from petals_cli import transport
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.errors import InvalidRequestError
from petals_cli.testing import make_tiny_model
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest, model_prefix_for
from tests.conftest import Swarm
from tests.swarm.raw import call_stream, open_raw, open_session, peer_id_of

pytestmark = pytest.mark.slow
NUM_LAYERS = 2
TARGETS = ("self_attn.q_proj", "self_attn.v_proj")
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-client-lora", "llama", num_layers=NUM_LAYERS)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        server = swarm.start(":")
        torch.manual_seed(0)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                            init_lora_weights=False)  # fmt: skip
        reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config).eval()
        client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))
        try:
            yield client, client.stub(peer_id_of(server)), model_prefix_for(str(model)), reference
        finally:
            client.close()
    finally:
        swarm.stop()


def lora_weights(reference) -> list[torch.nn.Parameter]:
    """A and B of every block and target, in wire order."""
    weights = []
    for layer in reference.base_model.model.model.layers:
        for target in TARGETS:
            module = layer.get_submodule(target)
            weights += [module.lora_A["default"].weight, module.lora_B["default"].weight]
    return weights


def request(prefix: str, *, lora: bool = True, **fields) -> SpanRequest:
    sent = dict(lora_targets=TARGETS, lora_rank=RANK, lora_scaling=ALPHA / RANK) if lora else {}
    return SpanRequest(PROTOCOL_VERSION, prefix, 0, NUM_LAYERS, **{**sent, **fields})


async def unary(stub, method: str, tensors: list[torch.Tensor], meta: SpanRequest) -> list[torch.Tensor]:
    count = 1 if method == "rpc_forward" else len(tensors) - 1  # a backward: the input's and each weight's gradient
    messages = transport.request_messages(tensors, transport.pack(meta))
    outputs, metadata = await call_stream(stub, method, messages, count)
    transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
    return outputs


def head(reference, hidden: torch.Tensor) -> torch.Tensor:
    """The client's local part after the blocks: final norm and LM head."""
    model = reference.base_model.model
    return model.lm_head(model.model.norm(hidden))


def test_forward_and_backward_with_sent_lora_equal_local_peft_and_leave_nothing_behind(setup):
    client, stub, prefix, reference = setup
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, reference.config.hidden_size)
    weights = [weight.detach().clone() for weight in lora_weights(reference)]
    meta = request(prefix, graph_id="g" * 16)

    (output,) = client.run(unary(stub, "rpc_forward", [hidden, *weights], meta), timeout=60)
    embeddings = hidden.clone().requires_grad_(True)
    logits = reference(inputs_embeds=embeddings).logits
    torch.testing.assert_close(head(reference, output), logits, atol=1e-4, rtol=0)

    projection = torch.randn_like(logits)
    reference.zero_grad()
    (logits * projection).sum().backward()
    leaf = output.detach().requires_grad_(True)
    (head(reference, leaf) * projection).sum().backward()
    grads = client.run(unary(stub, "rpc_backward", [hidden, leaf.grad, *weights], meta), timeout=60)
    assert len(grads) == 1 + len(weights) == 9
    torch.testing.assert_close(grads[0], embeddings.grad, atol=1e-5, rtol=1e-4)
    for grad, weight in zip(grads[1:], lora_weights(reference), strict=True):
        assert grad.shape == weight.shape and grad.dtype == torch.float32
        torch.testing.assert_close(grad, weight.grad, atol=1e-5, rtol=1e-4)

    (plain,) = client.run(unary(stub, "rpc_forward", [hidden], request(prefix, lora=False)), timeout=60)
    with torch.no_grad(), reference.disable_adapter():
        torch.testing.assert_close(head(reference, plain), reference(inputs_embeds=hidden).logits, atol=1e-4, rtol=0)
    assert not torch.allclose(plain, output, atol=1e-3)


def test_an_inference_session_opened_with_lora_steps_like_the_forward_beside_a_plain_session(setup):
    client, stub, prefix, reference = setup
    torch.manual_seed(2)
    hidden = torch.randn(1, 6, reference.config.hidden_size)
    weights = [weight.detach().clone() for weight in lora_weights(reference)]

    async def main():
        (expected,) = await unary(stub, "rpc_forward", [hidden, *weights], request(prefix))
        (base,) = await unary(stub, "rpc_forward", [hidden], request(prefix, lora=False))
        opening = runtime_pb2.ExpertRequest(
            metadata=transport.pack(request(prefix, max_length=8)),
            tensors=[transport.serialize(weight) for weight in weights],
        )
        adapted, answer = await open_raw(stub, opening)
        transport.check_response(answer)
        plain = await open_session(stub, prefix, NUM_LAYERS, 8)
        outputs = [await adapted.step(hidden[:, :3])]
        others = [await plain.step(hidden[:, :3])]
        for position in range(3, 6):  # one-token steps of both sessions at once: never one batch
            token = hidden[:, position : position + 1]
            mine, other = await asyncio.gather(adapted.step(token), plain.step(token))
            outputs.append(mine)
            others.append(other)
        await adapted.end()
        await plain.end()
        return expected, base, torch.cat(outputs, dim=1), torch.cat(others, dim=1)

    expected, base, stepped, plain = client.run(main(), timeout=60)
    # a cached step and a whole forward round differently; these hidden states reach a few hundred
    tolerance = 1e-4 + 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(stepped, expected, atol=tolerance, rtol=0)
    torch.testing.assert_close(plain, base, atol=tolerance, rtol=0)
    assert not torch.allclose(stepped, plain, atol=1e-2)


def test_bad_lora_is_refused_and_the_server_keeps_serving(setup):
    client, stub, prefix, reference = setup
    hidden = torch.randn(1, 4, reference.config.hidden_size)
    weights = [weight.detach().clone() for weight in lora_weights(reference)]
    nan = [weight.clone() for weight in weights]
    nan[5][0, 0] = float("nan")
    for meta, tensors, problem in [
        (request(prefix, lora_rank=65), [hidden, *weights], "lora_rank must be in 1..64"),
        (request(prefix, lora_targets=("self_attn.nope",)), [hidden, *weights[:4]], "'self_attn.nope' is not"),
        (request(prefix), [hidden, *weights[:-1]], "expected 9 tensors, got 8"),
        (request(prefix), [hidden, *nan], "B of self_attn.q_proj in block 1 contains NaN"),
        (request(prefix, adapter="served"), [hidden, *weights], "not both"),
    ]:
        with pytest.raises(InvalidRequestError, match=problem):
            client.run(unary(stub, "rpc_forward", tensors, meta), timeout=60)

    async def refused_opening():
        opening = runtime_pb2.ExpertRequest(
            metadata=transport.pack(request(prefix, max_length=8, lora_rank=RANK + 1)),
            tensors=[transport.serialize(weight) for weight in weights],
        )
        session, answer = await open_raw(stub, opening)
        await session.abort()
        return answer

    with pytest.raises(InvalidRequestError, match=r"A of self_attn.q_proj in block 0 must have shape \[5, 64\]"):
        transport.check_response(client.run(refused_opening(), timeout=60))
    (output,) = client.run(unary(stub, "rpc_forward", [hidden, *weights], request(prefix)), timeout=60)
    with torch.no_grad():
        torch.testing.assert_close(head(reference, output), reference(inputs_embeds=hidden).logits, atol=1e-4, rtol=0)
