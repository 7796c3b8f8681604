"""Padded batches through a real swarm: every row equals its prompt generated alone, even across a failover."""

import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.generation import GenerationOptions, generate_batch
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm, petals_command

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PROMPTS = [
    "A swarm of small servers runs one large model",
    "Hello",
    "Each server holds a few blocks and a cache for every session it serves",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "bloom"])
def setup(request, tmp_path_factory):
    model = make_tiny_model(
        tmp_path_factory.mktemp("models") / f"tiny-{request.param}", request.param, num_layers=NUM_LAYERS
    )
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:2", "2:4", "2:4")  # a replica of the second span for the failover test
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        yield model, distributed, local, tokenizer, swarm
        distributed.close()
    finally:
        swarm.stop()


def local_alone(local, tokenizer, prompt: str, new_tokens: int = NEW_TOKENS) -> list[int]:
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = local.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return output[0, input_ids.shape[1] :].tolist()


def test_a_padded_batch_equals_each_prompt_alone(setup):
    _, distributed, local, tokenizer, _ = setup
    lengths = {len(tokenizer(prompt).input_ids) for prompt in PROMPTS}
    assert len(lengths) == len(PROMPTS), "the prompts must need different amounts of padding"
    results = generate_batch(distributed, tokenizer, PROMPTS, GenerationOptions(max_new_tokens=NEW_TOKENS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        alone = distributed.generate(
            tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens=NEW_TOKENS, do_sample=False
        )
        assert result.token_ids == alone[0, -NEW_TOKENS:].tolist() == local_alone(local, tokenizer, prompt)
    assert len({tuple(result.token_ids) for result in results}) == len(PROMPTS), "degenerate test model"


def test_a_padded_session_replays_its_mask_on_failover(setup):
    _, distributed, local, tokenizer, swarm = setup
    rows = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    first, second = NEW_TOKENS // 2, NEW_TOKENS - NEW_TOKENS // 2
    with distributed.inference_session(max_length=width + NEW_TOKENS, batch_size=len(rows)) as session:
        output = distributed.generate(
            input_ids, attention_mask=mask, max_new_tokens=first, do_sample=False, pad_token_id=0, session=session
        )
        peer_id = session.route[1].peer_id
        victim = next(server for server in swarm.servers if server.addresses()[0].endswith(peer_id))
        victim.process.kill()
        victim.process.wait()
        mask = torch.nn.functional.pad(mask, (0, first), value=1)
        output = distributed.generate(
            output, attention_mask=mask, max_new_tokens=second, do_sample=False, pad_token_id=0, session=session
        )
        assert session.failovers >= 1
    for row, prompt in zip(output[:, width:].tolist(), PROMPTS, strict=True):
        assert row == local_alone(local, tokenizer, prompt)


def test_generate_prompts_file_prints_each_result(setup, tmp_path, request):
    if request.node.callspec.params["setup"] != "llama":
        pytest.skip("the CLI path does not depend on the family: once, on llama, keeps the suite fast")
    model, _, local, tokenizer, swarm = setup
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("\n".join(json.dumps({"prompt": prompt}) for prompt in PROMPTS) + "\n")
    command = petals_command(
        "generate", str(model), "--prompts-file", str(prompts_file), "--batch-size", "2",
        "--max-new-tokens", str(NEW_TOKENS), "--json", *sum((["--initial-peers", p] for p in swarm.initial_peers), []),
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2]
    for line, prompt in zip(lines, PROMPTS, strict=True):
        assert line["token_ids"] == local_alone(local, tokenizer, prompt)
