"""LoRA weights a client sends with a request (issue 20): checked before compute, applied to that call only, and
differentiated; compared with the same model wrapped by peft, run locally."""

import pytest
import torch

from petals_cli.checkpoint import resolve_model
from petals_cli.errors import InvalidRequestError
from petals_cli.server import validation
from petals_cli.server.adapters import request_lora
from petals_cli.server.blocks import load_span, read_model_config
from petals_cli.server.compute import SpanCompute
from petals_cli.server.graphs import KeptGraphs
from petals_cli.server.sessions import ServerSession
from petals_cli.step import Step
from petals_cli.testing import make_tiny_model
from petals_cli.wire import PROTOCOL_VERSION, SpanRequest

TARGETS = ("self_attn.q_proj", "self_attn.v_proj")
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("client-lora") / "tiny", "llama", num_layers=2)


@pytest.fixture(scope="module")
def span(model_path):
    source = resolve_model(str(model_path))
    return load_span(source, read_model_config(source), 0, 2, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def peft_model(model_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # fmt: skip
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), config).eval()


def peft_weights(peft_model) -> list[torch.Tensor]:
    """The peft model's A and B in wire order: per block, per target."""
    layers = peft_model.base_model.model.model.layers
    weights = []
    for layer in layers:
        for target in TARGETS:
            module = layer.get_submodule(target)
            weights += [module.lora_A["default"].weight, module.lora_B["default"].weight]
    return weights


def lora_request(**fields) -> SpanRequest:
    base = dict(protocol=PROTOCOL_VERSION, prefix="tiny", start_block=0, end_block=2, lora_targets=list(TARGETS),
                lora_rank=RANK, lora_scaling=ALPHA / RANK)  # fmt: skip
    return validation.check_span_request({**base, **fields}, "tiny", (0, 2))


def random_weights(span, request: SpanRequest) -> list[torch.Tensor]:
    weights = []
    for block in range(request.start_block, request.end_block):
        for target in request.lora_targets:
            module = span.layers[block].get_submodule(target)
            weights += [
                torch.randn(request.lora_rank, module.in_features),
                torch.randn(module.out_features, request.lora_rank),
            ]
    return weights


def test_lora_requests_are_checked_and_every_refusal_names_the_problem(span):
    assert lora_request().lora_targets == TARGETS
    assert validation.lora_tensor_count(lora_request(start_block=1)) == 4
    for fields, problem in [
        (dict(lora_rank=0), "lora_rank must be in 1..64"),
        (dict(lora_rank=65), "lora_rank must be in 1..64"),
        (dict(lora_targets=[f"t{index}" for index in range(17)]), "at most 16 lora_targets"),
        (dict(lora_targets=["self_attn.q_proj", "self_attn.q_proj"]), "'self_attn.q_proj' twice"),
        (dict(lora_targets=["x" * 300]), "at most 256 characters"),
        (dict(lora_scaling=float("nan")), "lora_scaling must be finite"),
        (dict(lora_scaling=float("inf")), "lora_scaling must be finite"),
        (dict(adapter="served"), "a served adapter or send its own LoRA weights, not both"),
        (dict(lora_targets=[1]), "lora_targets"),
    ]:
        with pytest.raises(InvalidRequestError, match=problem):
            lora_request(**fields)

    request = lora_request()
    good = random_weights(span, request)
    assert request_lora(span, request, good).modules[1] is span.layers[0].self_attn.v_proj
    assert request_lora(span, lora_request(lora_targets=[]), []) is None
    nan = [tensor.clone() for tensor in good]
    nan[3][0, 0] = float("nan")
    for targets, tensors, problem in [
        (["self_attn.nope"], None, "'self_attn.nope' is not a module"),
        (["self_attn.q_proj.weight"], None, "'self_attn.q_proj.weight' is not a module"),
        (["mlp.act_fn"], None, "'mlp.act_fn' is not a linear layer"),
        (["input_layernorm"], None, "'input_layernorm' is not a linear layer"),
        ([""], None, "'' is not a linear layer"),
        (TARGETS, good[:-1], "expected 8 LoRA tensors, got 7"),
        (TARGETS, [good[0].T, *good[1:]], r"A of self_attn.q_proj in block 0 must have shape \[4, 64\]"),
        (TARGETS, [*good[:3], good[3].long(), *good[4:]], "B of self_attn.v_proj in block 0 must be floating"),
        (TARGETS, nan, "B of self_attn.v_proj in block 0 contains NaN"),
    ]:
        request = lora_request(lora_targets=list(targets))
        with pytest.raises(InvalidRequestError, match=problem):
            request_lora(span, request, good if tensors is None else tensors)  # targets are resolved first
    with pytest.raises(InvalidRequestError, match="2 unexpected tensors"):
        request_lora(span, lora_request(lora_targets=[]), good[:2])


def test_sent_lora_gives_peft_outputs_and_gradients_and_leaves_nothing_behind(span, peft_model):
    torch.manual_seed(1)
    compute = SpanCompute(span, KeptGraphs())
    model = peft_model.base_model.model
    hidden = torch.randn(2, 5, span.config.hidden_size)
    plain = SpanRequest(PROTOCOL_VERSION, "tiny", 0, 2)
    base_before = compute.forward(hidden, plain, None)[0]

    request = lora_request(graph_id="g")
    lora = request_lora(span, request, [weight.detach().clone() for weight in peft_weights(peft_model)])
    output = compute.forward(hidden, request, None, lora)[0]
    embeddings = hidden.clone().requires_grad_(True)
    logits = peft_model(inputs_embeds=embeddings).logits
    torch.testing.assert_close(model.lm_head(model.model.norm(output)), logits, atol=1e-4, rtol=0)

    weights = torch.randn_like(logits)
    peft_model.zero_grad()
    (logits * weights).sum().backward()
    leaf = output.detach().requires_grad_(True)
    (model.lm_head(model.model.norm(leaf)) * weights).sum().backward()
    assert len(compute.graphs) == 1
    grads = compute.backward(hidden, leaf.grad, request, None, lora)
    assert len(compute.graphs) == 0  # the kept graph served it
    assert len(grads) == 1 + 8
    torch.testing.assert_close(grads[0], embeddings.grad, atol=1e-5, rtol=1e-4)
    for grad, weight in zip(grads[1:], peft_weights(peft_model), strict=True):
        assert grad.shape == weight.shape and grad.dtype == torch.float32
        torch.testing.assert_close(grad, weight.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(compute.forward(hidden, plain, None)[0], base_before)

    # a backward with other weights under the same graph id recomputes: a kept graph serves identical weights only
    compute.forward(hidden, request, None, lora)
    other = request_lora(span, request, [weight * 0.5 for weight in lora.tensors])
    recomputed = compute.backward(hidden, leaf.grad, request, None, other)
    fresh = compute.backward(hidden, leaf.grad, lora_request(), None, other)
    for left, right in zip(recomputed, fresh, strict=True):
        assert torch.equal(left, right)
    assert not torch.equal(recomputed[1], grads[1])


def test_steps_of_a_session_with_its_own_lora_run_alone(span):
    request = lora_request(max_length=8)
    lora = request_lora(span, request, random_weights(span, request))
    plain = SpanRequest(PROTOCOL_VERSION, "tiny", 0, 2, max_length=8)
    token = Step(0, torch.randn(1, 1, span.config.hidden_size))
    jobs = []
    for name, session_request, session_lora in (("a", request, lora), ("b", plain, None)):
        session = ServerSession(name * 32, session_request, span.make_cache(0, 2, capacity=8), lora=session_lora)
        session.batchable = span.can_batch(session.cache)
        jobs.append(session.job(token, others_open=True))
    assert jobs[0].lora is lora and not jobs[0].batchable and jobs[1].batchable
    assert jobs[0].group_key != jobs[1].group_key
