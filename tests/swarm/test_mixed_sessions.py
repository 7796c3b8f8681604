"""Very different sessions at once on the same servers: the step engine batches them, and each stays exact.

Plain sessions of short, medium and long prompts, a left-padded batch, a session with deep prompts and two
sessions through a LoRA adapter start a few milliseconds apart on two servers that each hold half of the blocks
(and the adapter). Every session's tokens must equal the same session run alone through the swarm and local
transformers (with peft for the adapter; the prompted reference of ``checks`` for the deep prompts).
"""

import dataclasses
import threading
import time

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_lora_adapter, make_tiny_model
from petals_cli.wire import ServerInfo
from tests.conftest import Swarm
from tests.swarm.checks import local_prompted_greedy

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
ADAPTER = "tiny-lora"
PRE_SEQ_LEN = 3
NEW_TOKENS = 12
PAD_ID = 0
STAGGER = 0.03  # seconds between the starts of consecutive sessions
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD_ID)


@dataclasses.dataclass
class Case:
    """One session: which client runs it and its rows (left-padded to one width when their lengths differ)."""

    name: str
    client: str  # "plain", "deep" or "adapter"
    rows: list[list[int]]

    @property
    def input_ids(self) -> torch.Tensor:
        width = max(len(row) for row in self.rows)
        return torch.tensor([[PAD_ID] * (width - len(row)) + row for row in self.rows])

    @property
    def attention_mask(self) -> torch.Tensor | None:
        if len({len(row) for row in self.rows}) == 1:
            return None
        width = max(len(row) for row in self.rows)
        return torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in self.rows])


def _ids(start: int, count: int) -> list[int]:
    return [1, *(4 + (start + 7 * index) % 500 for index in range(count - 1))]  # BOS, then no special tokens


CASES = [
    Case("plain, 3 tokens", "plain", [_ids(10, 3)]),
    Case("adapter, 5 tokens", "adapter", [_ids(20, 5)]),
    Case("padded batch, 4 and 11 tokens", "plain", [_ids(30, 4), _ids(40, 11)]),
    Case("deep prompts, 6 tokens", "deep", [_ids(50, 6)]),
    Case("plain, 9 tokens", "plain", [_ids(60, 9)]),
    Case("adapter, 12 tokens", "adapter", [_ids(70, 12)]),
    # longer than a server's prefill chunk (128 tokens): computed in chunks while the others decode
    Case("plain, 150 tokens", "plain", [_ids(80, 150)]),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import PeftModel

    models = tmp_path_factory.mktemp("models")
    model = make_tiny_model(models / "tiny-mixed", "llama", num_layers=NUM_LAYERS)
    adapter = make_lora_adapter(model, models / ADAPTER)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    clients = {}
    try:
        # Every session, with or without the adapter, goes through both servers: their steps can meet.
        swarm.start("0:2", "--adapters", str(adapter))
        swarm.start("2:4", "--adapters", str(adapter))
        connect = dict(initial_peers=swarm.initial_peers)
        clients["plain"] = AutoDistributedModelForCausalLM.from_pretrained(str(model), **connect)
        clients["adapter"] = AutoDistributedModelForCausalLM.from_pretrained(
            str(model), **connect, active_adapter=ADAPTER
        )
        clients["deep"] = AutoDistributedModelForCausalLM.from_pretrained(
            str(model), **connect, tuning_mode="deep_ptune", pre_seq_len=PRE_SEQ_LEN
        )
        torch.manual_seed(7)
        with torch.no_grad():
            for parameter in clients["deep"].prompt_tuning.parameters():
                parameter.normal_(0, 0.3)
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(adapter)).eval()
        yield swarm, clients, local, adapted
    finally:
        for client in clients.values():
            client.close()
        swarm.stop()


def remote_tokens(clients, case: Case) -> list[list[int]]:
    """The new tokens of each row of ``case``, generated greedily through the swarm in one session."""
    input_ids = case.input_ids
    output = clients[case.client].generate(input_ids, attention_mask=case.attention_mask, **GREEDY)
    return output[:, input_ids.shape[1] :].tolist()


def local_tokens(setup, case: Case) -> list[list[int]]:
    """Each row of ``case`` alone (no padding) through local transformers."""
    _, clients, local, adapted = setup
    rows = []
    for row in case.rows:
        input_ids = torch.tensor([row])
        if case.client == "deep":
            tuning = clients["deep"].prompt_tuning
            ids = local_prompted_greedy(local, input_ids, tuning.prefix.detach(), tuning.deep.detach(), NEW_TOKENS)
            rows.append(ids[len(row) :])
            continue
        model = adapted if case.client == "adapter" else local
        with torch.no_grad():
            output = model.generate(input_ids, **GREEDY)
        rows.append(output[0, len(row) :].tolist())
    return rows


def largest_batches(swarm, client) -> list[int]:
    """Each server's live ``largest_batch``: the most sessions one step has run together since it started."""
    figures = []
    for server in swarm.servers:
        peer_id = server.addresses()[0].rsplit("/p2p/", 1)[1]
        answer = client.run(client.stub(peer_id).rpc_info(runtime_pb2.ExpertUID(uid="")), timeout=10)
        figures.append(ServerInfo.from_wire(msgpack.unpackb(answer.serialized_info, raw=False)).largest_batch)
    return figures


@pytest.fixture(scope="module")
def expected(setup) -> list[list[list[int]]]:
    return [local_tokens(setup, case) for case in CASES]


def test_concurrent_sessions_of_every_kind_equal_each_run_alone_and_local(setup, expected):
    swarm, clients, _, _ = setup
    alone = [remote_tokens(clients, case) for case in CASES]  # one after the other: nothing to batch with
    assert max(largest_batches(swarm, clients["plain"].petals_client)) == 1
    together, errors = [None] * len(CASES), []

    def run(index: int) -> None:
        time.sleep(index * STAGGER)
        try:
            together[index] = remote_tokens(clients, CASES[index])
        except Exception as exc:  # reported below with its session
            errors.append((CASES[index].name, exc))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(CASES))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a session hung"
    assert not errors, errors
    differences = [
        f"{case.name}: local {reference}, alone {tokens_alone}, among the others {tokens}"
        for case, reference, tokens_alone, tokens in zip(CASES, expected, alone, together, strict=True)
        if not reference == tokens_alone == tokens
    ]
    assert not differences, "\n".join(differences)
    largest = largest_batches(swarm, clients["plain"].petals_client)
    assert min(largest) > 1, largest  # each server's step engine ran steps of several sessions as one batch


def test_the_references_are_not_degenerate(setup, expected):
    """The adapter and the deep prompts (beyond their prefix) change the tokens; every session has its own."""
    _, clients, local, _ = setup
    for case, reference in zip(CASES, expected, strict=True):
        if case.client == "adapter":
            assert local_tokens(setup, dataclasses.replace(case, client="plain")) != reference
        if case.client == "deep":
            prefix = clients["deep"].prompt_tuning.prefix.detach()
            prefix_only = local_prompted_greedy(local, torch.tensor(case.rows), prefix, None, NEW_TOKENS)
            assert [prefix_only[len(case.rows[0]) :]] != reference
    assert len({tuple(rows[0]) for rows in expected}) == len(CASES)
