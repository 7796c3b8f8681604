"""LoRA that the client owns, trained through frozen remote blocks: gradients and logits equal local transformers +
peft, the saved adapter is a standard peft directory that `petals serve --adapters` serves, and generation with
the client's weights equals peft's.

The adapter is made (random, nonzero) before the swarm starts, so two of the servers can serve it from disk.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.client.verdicts import Verifier
from petals_cli.families import family_for
from petals_cli.lora import ClientLora, block_linear_shapes, resolve_targets
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PROMPT = torch.tensor([[1, 57, 210, 33, 98, 402, 17, 57, 210, 33]])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    path = make_tiny_model(models / "tiny-llama", "llama", num_layers=NUM_LAYERS)
    config = AutoConfig.from_pretrained(path)
    shapes = block_linear_shapes(config, family_for(config))
    lora = ClientLora(NUM_LAYERS, shapes, resolve_targets(shapes, ["q_proj", "v_proj"]), rank=4, alpha=8)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for weight in lora.weights:
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    adapter = lora.save_pretrained(models / "trained", base_model=str(path))
    swarm = Swarm(model=path, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:2", "2:4", "0:4")
        swarm.start("0:4", "--adapters", str(adapter))
        yield path, swarm, adapter
    finally:
        swarm.stop()


def local_peft(path, adapter=None):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(path)
    if adapter is not None:
        return PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(base, config)


def open_model(setup, **kwargs):
    path, swarm, _ = setup
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers, **kwargs)


def test_lora_gradients_through_the_swarm_equal_local_peft(setup):
    path, _, adapter = setup
    model = open_model(setup, tuning_mode="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    reference = local_peft(path, adapter)
    try:
        model.client_lora.load_pretrained(adapter)
        labels = PROMPT.clone()
        loss = model(PROMPT, labels=labels).loss
        loss.backward()
        expected = reference(PROMPT, labels=labels).loss
        expected.backward()
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        local_grads = {
            name.replace(".default", ""): parameter.grad
            for name, parameter in reference.named_parameters()
            if "lora_" in name
        }
        sent = model.client_lora.peft_state_dict()
        assert set(sent) == set(local_grads)
        for name, parameter in sent.items():
            assert parameter.grad is not None, name
            torch.testing.assert_close(parameter.grad, local_grads[name], atol=1e-5, rtol=1e-4)
        assert any(parameter.grad.abs().max() > 0 for parameter in sent.values())
    finally:
        model.close()


def test_a_trained_adapter_gives_the_same_logits_sent_served_and_local(setup):
    path, _, adapter = setup
    expected = local_peft(path, adapter).eval()(PROMPT).logits
    sent = open_model(setup, tuning_mode="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    served = open_model(setup, active_adapter=adapter.name)
    try:
        sent.client_lora.load_pretrained(adapter)
        with torch.no_grad():
            torch.testing.assert_close(sent(PROMPT).logits, expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(served(PROMPT).logits, expected, atol=1e-4, rtol=0)
        base = AutoModelForCausalLM.from_pretrained(path).eval()(PROMPT).logits
        assert (base - expected).abs().max() > 1e-2  # the adapter changes the outputs
    finally:
        sent.close()
        served.close()


def test_generation_with_the_clients_lora_equals_peft(setup):
    path, _, adapter = setup
    model = open_model(setup, tuning_mode="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    try:
        model.client_lora.load_pretrained(adapter)
        output = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
    finally:
        model.close()
    reference = local_peft(path, adapter).eval()
    assert output.tolist() == reference.generate(input_ids=PROMPT, max_new_tokens=12, do_sample=False).tolist()


MEMORISE = "the quick brown fox jumps over the lazy dog\n"
TRAIN_STEPS = 12


def lora_config(path, dataset, **overrides):
    from petals_cli.config import FinetuneConfig

    options = dict(model=str(path), dataset=str(dataset), method="lora", seq_len=32, batch_size=2, lr=0.05, seed=3)
    return FinetuneConfig(**{**options, "lora_r": 4, "lora_alpha": 8.0, **overrides})


def train_locally(path, config) -> list[float]:
    """The same run in local transformers + peft: same initial weights, batches, optimizer."""
    from transformers import AutoTokenizer

    from petals_cli.finetune import batch_for_step, load_texts, tokenize_texts, total_steps

    tokenizer = AutoTokenizer.from_pretrained(path)
    sequences = tokenize_texts(load_texts(config.dataset), tokenizer, config.seq_len)
    hf_config = AutoConfig.from_pretrained(path)
    torch.manual_seed(config.seed)
    shapes = block_linear_shapes(hf_config, family_for(hf_config))
    lora = ClientLora(NUM_LAYERS, shapes, resolve_targets(shapes, list(config.lora_target_modules)), 4, 8.0)
    reference = local_peft(path)
    named = dict(reference.named_parameters())
    with torch.no_grad():
        for name, weight in lora.peft_state_dict().items():
            target = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight"
            )
            named[target].copy_(weight)
    trainable = [parameter for name, parameter in reference.named_parameters() if "lora_" in name]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    losses = []
    for step in range(total_steps(config, len(sequences))):
        batch = batch_for_step(sequences, step, config.batch_size, config.seed)
        loss = reference(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_finetune_lora_memorises_like_local_peft_saves_a_peft_adapter_and_resumes(setup, tmp_path):
    from peft import PeftModel

    from petals_cli.config import ClientConfig
    from petals_cli.finetune import finetune

    path, swarm, _ = setup
    (tmp_path / "data.txt").write_text(MEMORISE * 2)
    client = ClientConfig(initial_peers=tuple(swarm.initial_peers))
    config = lora_config(path, tmp_path / "data.txt", steps=TRAIN_STEPS, output=str(tmp_path / "whole"))
    result = finetune(config, client)
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses  # it memorises
    local = train_locally(path, config)
    assert result.losses == pytest.approx(local, rel=1e-3, abs=1e-4)

    saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(tmp_path / "whole")).eval()
    sequence = torch.tensor([saved.base_model.model.config.bos_token_id or 1] + [5, 6, 7])[None]
    served = open_model(setup, tuning_mode="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    try:
        served.client_lora.load_pretrained(tmp_path / "whole")
        with torch.no_grad():
            torch.testing.assert_close(served(sequence).logits, saved(sequence).logits, atol=1e-4, rtol=0)
    finally:
        served.close()

    half = lora_config(path, tmp_path / "data.txt", steps=TRAIN_STEPS // 2, output=str(tmp_path / "half"))
    first_half = finetune(half, client)
    reports = []
    resumed = finetune(
        lora_config(path, tmp_path / "data.txt", steps=TRAIN_STEPS, resume=str(tmp_path / "half")),
        client,
        on_step=reports.append,
    )
    # only the steps after the checkpoint ran (a fresh run with the same seed would repeat every loss below)
    assert [report.step for report in reports] == list(range(TRAIN_STEPS // 2 + 1, TRAIN_STEPS + 1))
    assert first_half.tokens + resumed.tokens == result.tokens
    assert resumed.losses == pytest.approx(result.losses, rel=1e-5, abs=1e-6)


def test_the_cli_trains_lora_and_saves_a_peft_adapter(setup, tmp_path, monkeypatch, capsys):
    import json

    from tests.cli.inprocess import run_here

    path, swarm, _ = setup
    (tmp_path / "data.txt").write_text(MEMORISE * 2)
    result = run_here(
        monkeypatch, capsys, "finetune", str(path), "--dataset", str(tmp_path / "data.txt"), "--method", "lora",
        "--lora-r", "2", "--lora-alpha", "4", "--lora-target-modules", "q_proj", "--seq-len", "16", "--steps", "2",
        "--output", str(tmp_path / "adapter"), "--json", "--initial-peers", *swarm.initial_peers,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 4.0)
    assert config["target_modules"] == ["self_attn.q_proj"]
    refused = run_here(
        monkeypatch, capsys, "finetune", str(path), "--dataset", str(tmp_path / "data.txt"), "--method", "lora",
        "--lora-target-modules", "gate", "--steps", "1", "--initial-peers", *swarm.initial_peers,
    )  # fmt: skip
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "'gate' matches no linear layer" in errors[0]


def test_verification_checks_client_sent_weights_too(setup):
    """Every request checked on a replica, which gets the same weights: no disagreement, exact gradients."""
    from petals_cli.config import ClientConfig

    path, swarm, adapter = setup
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), verify_rate=1.0)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), config=config, tuning_mode="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"]
    )
    reference = local_peft(path, adapter)
    try:
        model.client_lora.load_pretrained(adapter)
        model(PROMPT, labels=PROMPT).loss.backward()
        reference(PROMPT, labels=PROMPT).loss.backward()
        local_grads = {
            name.replace(".default", ""): p.grad for name, p in reference.named_parameters() if "lora_" in name
        }
        for name, parameter in model.client_lora.peft_state_dict().items():
            torch.testing.assert_close(parameter.grad, local_grads[name], atol=1e-5, rtol=1e-4)
        assert Verifier.of(model.petals_client).verified_peers and not model.petals_client.bans.forever
        with model.inference_session(max_length=32) as session:
            model.generate(PROMPT, max_new_tokens=6, do_sample=False, session=session)
            session.settle_checks()
            assert session.verified_steps > 0 and session.caught == 0
    finally:
        model.close()


def test_training_with_client_sent_weights_fails_over_exactly(setup, monkeypatch, caplog):
    """A server of the route a step's forward took is killed before that step's backward: the backward fails over
    (the client's warning names that server), the gradients stay exact, and later steps route around it (last in
    this module: the swarm loses a server; any one of the four leaves a route)."""
    import logging
    import signal

    from petals_cli.client.autograd import RemoteChain

    path, swarm, adapter = setup
    routes = []  # every route a training request took, in order (training routes are drawn at random)
    choose_route = RemoteChain.route

    async def recorded_route(chain, start, end):
        routes.append(await choose_route(chain, start, end))
        return routes[-1]

    monkeypatch.setattr(RemoteChain, "route", recorded_route)
    model = open_model(setup, tuning_mode="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    reference = local_peft(path, adapter)
    reference(PROMPT, labels=PROMPT).loss.backward()
    local_grads = {name.replace(".default", ""): p.grad for name, p in reference.named_parameters() if "lora_" in name}

    def assert_exact_grads():
        for name, parameter in model.client_lora.peft_state_dict().items():
            torch.testing.assert_close(parameter.grad, local_grads[name], atol=1e-5, rtol=1e-4)

    try:
        model.client_lora.load_pretrained(adapter)
        loss = model(PROMPT, labels=PROMPT).loss
        (forward_route,) = routes
        victim = forward_route[-1].peer_id  # the first server the backward will call
        (server,) = [server for server in swarm.servers if server.addresses()[0].endswith(f"/p2p/{victim}")]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        with caplog.at_level(logging.WARNING, logger="petals_cli.client.autograd"):
            loss.backward()
        failovers = [
            record.getMessage()
            for record in caplog.records
            if record.name == "petals_cli.client.autograd" and "failing over" in record.getMessage()
        ]
        assert len(failovers) == 1 and failovers[0].startswith(f"server {victim[-8:]} "), failovers
        assert len(routes) >= 2 and victim not in {span.peer_id for span in routes[1]}, routes  # the replacement
        assert_exact_grads()
        for _ in range(2):
            model.client_lora.zero_grad()
            model(PROMPT, labels=PROMPT).loss.backward()
            assert_exact_grads()
        assert all(victim not in {span.peer_id for span in route} for route in routes[1:]), routes
    finally:
        model.close()
