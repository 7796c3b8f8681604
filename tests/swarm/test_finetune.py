"""Prompt tuning through a real swarm: gradients, training, checkpoints, generation and failover."""

import json
import math
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.finetune import STATE_FILE
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm, petals_command
from tests.swarm.checks import causal_lm_loss, eventually, local_prompted_greedy, local_prompted_logits

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PRE_SEQ_LEN = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", num_layers=NUM_LAYERS)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:2", "2:4", "1:4")
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        yield model, swarm, local, tokenizer
    finally:
        swarm.stop()


@pytest.mark.parametrize("method", ["ptune", "deep_ptune"])
def test_prompt_gradients_through_the_swarm_equal_local_autograd(setup, method):
    model, swarm, local, tokenizer = setup
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        str(model), initial_peers=swarm.initial_peers, tuning_mode=method, pre_seq_len=PRE_SEQ_LEN
    )
    try:
        tuning = distributed.prompt_tuning
        torch.manual_seed(5)
        with torch.no_grad():
            for parameter in tuning.parameters():
                parameter.normal_(0, 0.3)
        input_ids = torch.randint(0, 500, (2, 7))
        loss = distributed(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        reference = [parameter.detach().clone().requires_grad_(True) for parameter in tuning.parameters()]
        local_loss = causal_lm_loss(
            local_prompted_logits(local, input_ids, reference[0], reference[1] if method == "deep_ptune" else None),
            input_ids,
        )
        local_loss.backward()
        torch.testing.assert_close(loss.detach(), local_loss.detach(), atol=1e-5, rtol=1e-5)
        for parameter, expected in zip(tuning.parameters(), reference, strict=True):
            assert expected.grad.abs().sum() > 0
            torch.testing.assert_close(parameter.grad, expected.grad, atol=1e-5, rtol=1e-4)
        assert distributed.trainable_parameters() == list(tuning.parameters())
        assert len(distributed.trainable_parameters()) == (2 if method == "deep_ptune" else 1)
    finally:
        distributed.close()


MEMORISE = "the quick brown fox\n"  # shorter than seq_len: one sequence, seen at every step
TRAIN_STEPS = 20


def _config(model, dataset, **overrides):
    from petals_cli.config import FinetuneConfig

    options = dict(model=str(model), dataset=str(dataset), method="deep_ptune", seq_len=64, batch_size=2)
    return FinetuneConfig(**{**options, "pre_seq_len": PRE_SEQ_LEN, "lr": 0.1, "seed": 3, **overrides})


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """deep_ptune prompts trained on a tiny memorisation dataset (the loss curve and where they were saved)."""
    from petals_cli.config import ClientConfig
    from petals_cli.finetune import finetune

    model, swarm, _, _ = setup
    workdir = tmp_path_factory.mktemp("finetune")
    (workdir / "data.txt").write_text(MEMORISE * 2)
    config = _config(model, workdir / "data.txt", steps=TRAIN_STEPS, output=str(workdir / "prompts"))
    result = finetune(config, ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    return config, result


def test_training_memorises_and_the_saved_prompts_reload_to_the_same_loss(setup, trained):
    from petals_cli.finetune import batch_for_step, load_texts, tokenize_texts
    from petals_cli.prompts import load_prompts

    model, swarm, local, tokenizer = setup
    config, result = trained
    assert len(result.losses) == TRAIN_STEPS and result.steps == TRAIN_STEPS
    assert result.losses[-1] < 0.75 * result.losses[0]
    batch = batch_for_step(tokenize_texts(load_texts(config.dataset), tokenizer, config.seq_len), 0, 2, config.seed)
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        str(model), initial_peers=swarm.initial_peers, prompts=config.output
    )
    try:
        with torch.no_grad():
            reloaded = distributed(input_ids=batch, labels=batch).loss
    finally:
        distributed.close()
    saved, metadata = load_prompts(config.output)
    assert metadata["method"] == "deep_ptune" and metadata["model"] == str(model)
    with torch.no_grad():
        expected = causal_lm_loss(local_prompted_logits(local, batch, saved.prefix, saved.deep), batch)
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)
    assert reloaded < 0.75 * result.losses[0]


def test_resume_after_a_kill_reaches_the_same_losses_as_an_uninterrupted_run(setup, trained, tmp_path):
    model, swarm, _, _ = setup
    config, result = trained
    checkpoint = tmp_path / "checkpoint"
    common = [
        *("finetune", str(model), "--dataset", config.dataset, "--method", "deep_ptune", "--seq-len", "64"),
        *("--batch-size", "2", "--pre-seq-len", str(PRE_SEQ_LEN), "--lr", "0.1", "--seed", "3"),
        *("--steps", str(TRAIN_STEPS), "--initial-peers", *swarm.initial_peers),
    ]
    interrupted = subprocess.Popen(
        petals_command(*common, "--save-every", "2", "--output", str(checkpoint)), stderr=subprocess.DEVNULL
    )
    try:
        stopped = lambda: (checkpoint / STATE_FILE).exists() or interrupted.poll() is not None  # noqa: E731
        assert eventually(stopped, timeout=60, interval=0.01)
        assert interrupted.poll() is None, "the run ended before it could be interrupted"
        interrupted.kill()
    finally:
        interrupted.kill()
        interrupted.wait()
    resumed = subprocess.run(
        petals_command(*common, "--resume", str(checkpoint), "--json"), capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["steps"] == TRAIN_STEPS and report["output"] == str(checkpoint)
    assert report["final_loss"] == pytest.approx(result.losses[-1], abs=1e-5)
    assert report["losses"] == pytest.approx(result.losses, abs=1e-5)


def test_generation_with_trained_prompts_changes_the_output_and_equals_local(setup, trained):
    from petals_cli.prompts import load_prompts

    model, swarm, local, tokenizer = setup
    config, _ = trained
    input_ids = tokenizer("the quick", return_tensors="pt").input_ids
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        str(model), initial_peers=swarm.initial_peers, prompts=config.output
    )
    try:
        prompted = distributed.generate(input_ids, max_new_tokens=8, do_sample=False)[0].tolist()
        distributed.set_prompts(None)
        plain = distributed.generate(input_ids, max_new_tokens=8, do_sample=False)[0].tolist()
    finally:
        distributed.close()
    saved, _ = load_prompts(config.output)
    assert prompted == local_prompted_greedy(local, input_ids, saved.prefix.detach(), saved.deep.detach(), 8)
    assert prompted != plain
    command = petals_command(
        *("generate", str(model), "--prompt", "the quick", "--max-new-tokens", "8", "--json"),
        *("--prompts", config.output, "--initial-peers", *swarm.initial_peers),
    )
    cli = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["token_ids"] == prompted[input_ids.shape[1] :]


def test_bad_prompts_and_unknown_adapters_are_refused_with_typed_errors(setup):
    from hivemind.proto import runtime_pb2

    from petals_cli import transport
    from petals_cli.client import SwarmClient
    from petals_cli.config import ClientConfig
    from petals_cli.errors import InvalidRequestError
    from petals_cli.wire import PROTOCOL_VERSION, SpanRequest

    model, swarm, _, _ = setup
    peer_id = swarm.servers[0].addresses()[0].rsplit("/p2p/", 1)[1]  # blocks 0:2
    client = SwarmClient(ClientConfig(initial_peers=tuple(swarm.initial_peers)))

    async def forward(request, tensors):
        async def requests():
            for message in transport.request_messages(tensors, transport.pack(request)):
                yield message

        outputs, metadata = await transport.read_answer(await client.stub(peer_id).rpc_forward(requests()), 1)
        transport.check_response(runtime_pb2.ExpertResponse(metadata=metadata))
        return outputs

    hidden, prompts = torch.zeros(1, 6, 64), torch.ones(2, PRE_SEQ_LEN, 64)
    with_prompts = SpanRequest(PROTOCOL_VERSION, model.name, 0, 2, prompts=True)
    try:
        bad_requests = [
            (with_prompts, [hidden]),  # the prompts are missing
            (with_prompts, [hidden, torch.ones(3, PRE_SEQ_LEN, 64)]),  # one row per block: 2, not 3
            (with_prompts, [hidden, torch.ones(2, PRE_SEQ_LEN, 7)]),
            (with_prompts, [hidden, torch.ones(2, PRE_SEQ_LEN, 64, dtype=torch.long)]),
            (SpanRequest(PROTOCOL_VERSION, model.name, 0, 2, adapter="nope"), [hidden]),
        ]
        for request, tensors in bad_requests:
            with pytest.raises(InvalidRequestError):
                client.run(forward(request, tensors))
        (plain,) = client.run(forward(SpanRequest(PROTOCOL_VERSION, model.name, 0, 2), [hidden]))
        (prompted,) = client.run(forward(with_prompts, [hidden, prompts]))
        assert plain.shape == prompted.shape == hidden.shape and not torch.allclose(plain, prompted)
    finally:
        client.close()


def test_training_survives_a_replicated_server_killed_mid_epoch(setup, tmp_path):
    from petals_cli.config import ClientConfig
    from petals_cli.finetune import finetune

    model, swarm, _, _ = setup
    (tmp_path / "data.txt").write_text(MEMORISE * 2)
    replica = swarm.servers[2]  # blocks 1:4: 0:2 and 2:4 still cover everything without it

    def kill_after_two_steps(report):
        if report.step == 2:
            replica.process.kill()

    config = _config(model, tmp_path / "data.txt", steps=6)
    result = finetune(config, ClientConfig(initial_peers=tuple(swarm.initial_peers)), on_step=kill_after_two_steps)
    assert replica.process.wait(10) is not None
    assert len(result.losses) == 6 and all(math.isfinite(loss) for loss in result.losses)
