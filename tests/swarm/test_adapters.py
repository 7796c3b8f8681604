"""LoRA adapters served by real servers: outputs equal local transformers + peft; others are not used."""

import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_lora_adapter, make_tiny_model
from tests.conftest import Swarm, petals_command

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
ADAPTER = "tiny-lora"
PROMPT = "A swarm of small servers runs one large model"


def _peer_id(server) -> str:
    return server.addresses()[0].rsplit("/p2p/", 1)[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import PeftModel

    models = tmp_path_factory.mktemp("models")
    model = make_tiny_model(models / "tiny-llama", "llama", num_layers=NUM_LAYERS)
    adapter = make_lora_adapter(model, models / ADAPTER)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start("0:4")  # no adapter: fast, whole model, and never used by adapter requests
        with_adapter = ["--adapters", str(adapter)]
        started = [swarm.start(blocks, *with_adapter, wait=False) for blocks in ("0:2", "2:4")]
        for server in started:
            swarm.wait_ready(server)
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapter)).eval()
        yield model, swarm, local, adapted, AutoTokenizer.from_pretrained(model)
    finally:
        swarm.stop()


def test_generation_with_a_served_adapter_equals_local_peft_and_avoids_other_servers(setup):
    model, swarm, local, adapted, tokenizer = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        str(model), initial_peers=swarm.initial_peers, active_adapter=ADAPTER
    )
    try:
        with distributed.inference_session(max_length=input_ids.shape[1] + 16) as session:
            remote = distributed.generate(input_ids, max_new_tokens=16, do_sample=False, session=session)
            route = session.route
        with torch.no_grad():
            logits = distributed(input_ids).logits
    finally:
        distributed.close()
    expected = adapted.generate(input_ids, max_new_tokens=16, do_sample=False)
    plain = local.generate(input_ids, max_new_tokens=16, do_sample=False)
    assert remote.tolist() == expected.tolist()
    assert remote.tolist() != plain.tolist()
    with torch.no_grad():
        torch.testing.assert_close(logits, adapted(input_ids).logits, atol=1e-4, rtol=0)
    adapter_peers = {_peer_id(server) for server in swarm.servers[1:]}
    assert {span.peer_id for span in route} == adapter_peers
    assert "session" not in swarm.servers[0].log()


def test_cli_generate_with_adapter(setup):
    model, swarm, _, adapted, tokenizer = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    command = petals_command(
        *("generate", str(model), "--prompt", PROMPT, "--max-new-tokens", "8", "--json"),
        *("--initial-peers", *swarm.initial_peers, "--adapter", ADAPTER),
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = adapted.generate(input_ids, max_new_tokens=8, do_sample=False)[0, -8:].tolist()
    assert json.loads(result.stdout)["token_ids"] == expected


def test_an_adapter_no_server_has_is_a_clear_error(setup):
    model, swarm, _, _, _ = setup
    command = petals_command(
        *("generate", str(model), "--prompt", "hi", "--max-new-tokens", "2", "--adapter", "missing"),
        *("--initial-peers", *swarm.initial_peers, "--route-wait", "0"),
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 5, result.stderr
    assert "no server of tiny-llama has the adapter 'missing'" in result.stderr
