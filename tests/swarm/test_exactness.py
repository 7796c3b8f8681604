"""Generation, logits and gradients through a real 3-server swarm equal local transformers."""

import json
import subprocess

import pytest
import torch
from hivemind.p2p.p2p_daemon_bindings.control import DEFAULT_MAX_MSG_SIZE
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.client.streams import Opener
from petals_cli.config import ClientConfig
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm, petals_command
from tests.swarm.checks import assert_input_gradients_match

pytestmark = pytest.mark.slow
NUM_LAYERS = 6
PROMPT = "A swarm of small servers runs one large model"


class CollectingStreamer:
    """A transformers streamer: receives the prompt, then every new token as it is generated."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        pass


@pytest.fixture(scope="module", params=["llama", "bloom"])
def setup(request, tmp_path_factory):
    model = make_tiny_model(
        tmp_path_factory.mktemp("models") / f"tiny-{request.param}", request.param, num_layers=NUM_LAYERS
    )
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:1", "1:4", f"4:{NUM_LAYERS}")
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        yield distributed, local, tokenizer, swarm
        distributed.close()
    finally:
        swarm.stop()


def test_greedy_generation_equals_local(setup):
    distributed, local, tokenizer, _ = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    streamed = CollectingStreamer()
    remote = distributed.generate(input_ids, max_new_tokens=32, do_sample=False, streamer=streamed)
    reference = local.generate(input_ids, max_new_tokens=32, do_sample=False)
    assert remote.shape[1] == input_ids.shape[1] + 32
    assert remote.tolist() == reference.tolist()
    assert streamed.chunks[0] == input_ids[0].tolist() and len(streamed.chunks) == 33
    assert sum(streamed.chunks[1:], []) == remote[0, input_ids.shape[1] :].tolist()
    assert len(set(remote[0, input_ids.shape[1] :].tolist())) > 3, "degenerate test model"


def test_a_server_whose_push_is_refused_lets_the_client_relay_that_hop_exactly(setup, monkeypatch):
    distributed, local, tokenizer, _ = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    opened = Opener.open

    async def open_with_a_wrong_session_id_for_the_last_span(self, span):
        stream = await opened(self, span)
        if span.end == NUM_LAYERS:  # the middle server's pushes now go to a session its next server does not have
            stream.session_id = "no-such-session"
        return stream

    monkeypatch.setattr(Opener, "open", open_with_a_wrong_session_id_for_the_last_span)
    with distributed.inference_session(max_length=input_ids.shape[1] + 8) as session:
        remote = distributed.generate(input_ids, max_new_tokens=8, do_sample=False, session=session)
        assert session.relayed_hops == 8 and session.failovers == 0  # that hop of all 8 steps (the prompt, 7 tokens)
    assert remote.tolist() == local.generate(input_ids, max_new_tokens=8, do_sample=False).tolist()


def test_a_16_bit_wire_dtype_sends_rounded_activations_and_answers_in_the_clients_dtype(setup):
    distributed, _, _, swarm = setup
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), wire_dtype="bfloat16")
    halved = AutoDistributedModelForCausalLM.from_pretrained(str(swarm.model), config=config)
    hidden = torch.randn(1, 5, distributed.config.hidden_size, generator=torch.Generator().manual_seed(0))
    try:
        outputs = []
        for model in (distributed, halved):
            with model.inference_session(max_length=5) as session:
                outputs.append(session.step(hidden))
    finally:
        halved.close()
    exact, rounded = outputs
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)  # it did travel as bfloat16
    # and only bfloat16 rounding apart (8 significant bits, rounded at every hop; these random blocks reach ~500)
    assert (rounded - exact).abs().max() <= 0.05 * exact.abs().max()


def test_prompts_too_large_for_a_unary_call_are_still_pushed_server_to_server_exactly(tmp_path):
    model = make_tiny_model(tmp_path / "wide", "llama", num_layers=2, hidden_size=256, num_heads=4)
    swarm = Swarm(model=model, workdir=tmp_path / "swarm")
    (tmp_path / "swarm").mkdir()
    input_ids = torch.randint(4, 200, (4, 1200), generator=torch.Generator().manual_seed(0))
    hidden_bytes = input_ids.numel() * 256 * 4  # the prefill's hidden states: 4.9 MB on the wire
    assert hidden_bytes > DEFAULT_MAX_MSG_SIZE  # more than the daemons carry in one unary call
    try:
        swarm.start_many("0:1", "1:2")
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
        try:
            with distributed.inference_session(max_length=1202, batch_size=4) as session:
                remote = distributed.generate(input_ids, max_new_tokens=2, do_sample=False, session=session)
                assert session.relayed_hops == 0 and session.failovers == 0  # the prefill went server to server
        finally:
            distributed.close()
    finally:
        swarm.stop()
    local = AutoModelForCausalLM.from_pretrained(model).eval()
    assert remote.tolist() == local.generate(input_ids, max_new_tokens=2, do_sample=False).tolist()


def test_sampling_with_a_seed_equals_local_sampling_with_that_seed(setup):
    distributed, local, tokenizer, _ = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    outputs = []
    for model in (distributed, local, distributed):
        torch.manual_seed(1234)
        outputs.append(model.generate(input_ids, max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95))
    assert outputs[0].tolist() == outputs[1].tolist() == outputs[2].tolist()


def test_logits_match_in_forward_and_in_every_generation_step(setup):
    distributed, local, tokenizer, _ = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(distributed(input_ids).logits, local(input_ids).logits, atol=1e-4, rtol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    remote = distributed.generate(input_ids, **kwargs)
    reference = local.generate(input_ids, **kwargs)
    for remote_step, reference_step in zip(remote.logits, reference.logits, strict=True):
        torch.testing.assert_close(remote_step, reference_step, atol=1e-4, rtol=0)


def test_gradients_wrt_input_embeddings_match_local_autograd(setup):
    distributed, local, tokenizer, _ = setup
    assert_input_gradients_match(distributed, local, tokenizer, PROMPT)


def test_cli_generate_json_equals_local_greedy(setup):
    _, local, tokenizer, swarm = setup
    command = petals_command(
        "generate",
        str(swarm.model),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "16",
        "--json",
        "--initial-peers",
        *swarm.initial_peers,
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    output = json.loads(result.stdout)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = local.generate(input_ids, max_new_tokens=16, do_sample=False)[0, input_ids.shape[1] :].tolist()
    assert output["token_ids"] == reference
    assert output["new_tokens"] == 16 and output["prompt_tokens"] == input_ids.shape[1]
    assert output["text"] == tokenizer.decode(reference, skip_special_tokens=True)
    assert output["seconds"] > 0
    # our own calls into transformers use the names it wants: no deprecation notice reaches the user's terminal
    assert "deprecated" not in result.stderr.lower(), result.stderr
    for server in swarm.servers:
        assert "deprecated" not in server.log().lower(), server.log()
        assert "self-check of blocks" in server.log()


def run_generate(swarm, *args):
    command = petals_command("generate", str(swarm.model), *args, "--initial-peers", *swarm.initial_peers)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def test_cli_stop_sequences_cut_the_output_and_a_seed_repeats_sampling(setup, request):
    if request.node.callspec.params["setup"] != "llama":
        pytest.skip("five CLI runs that do not depend on the family: once, on llama, keeps the suite fast")
    _, local, tokenizer, swarm = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    greedy = local.generate(input_ids, max_new_tokens=24, do_sample=False)[0, input_ids.shape[1] :]
    text = tokenizer.decode(greedy, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    stopped = json.loads(run_generate(swarm, "--prompt", PROMPT, "--max-new-tokens", "24", "--stop", stop, "--json"))
    assert stopped["text"] == expected
    assert stopped["new_tokens"] < 24
    streamed = run_generate(swarm, "--prompt", PROMPT, "--max-new-tokens", "24", "--stop", stop, "--stream")
    assert streamed.rstrip("\n") == expected
    sampled = ["--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "1.0", "--top-k", "50", "--seed", "7"]
    first, second = (json.loads(run_generate(swarm, *sampled, "--json")) for _ in range(2))
    assert first["token_ids"] == second["token_ids"]
    other_seed = json.loads(run_generate(swarm, *sampled[:-1], "8", "--json"))
    assert other_seed["token_ids"] != first["token_ids"]
