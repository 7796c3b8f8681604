"""Speculative decoding through a real swarm: drafts checked several at a time, rolled back on the servers when
they miss, with the model's own tokens (greedy: identical; sampling: the model's distribution) even across a
failover in the middle of a checked block of drafts."""

import copy
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.speculative import Speculation, SpeculationStats
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm

pytestmark = pytest.mark.slow
NUM_LAYERS = 4
PROMPT = torch.tensor([[1, 57, 210, 33, 98, 402, 17, 57, 210, 33, 98, 402, 17, 57, 210]])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-target", "llama", num_layers=NUM_LAYERS)


def noisy_copy(model, scale: float = 0.5):
    """A draft model close to ``model`` but not equal: noise on its last MLP (about half the probability mass of
    a next token's distribution in common with the model's at temperature 0.7; a quarter of greedy tokens equal)."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in noisy.model.layers[-1].mlp.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * scale)
    return noisy


@pytest.fixture(scope="module")
def setup(model_path, tmp_path_factory):
    swarm = Swarm(model=model_path, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:2", "2:4", "2:4")  # a spare for the last span: the failover test kills one
        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_path), initial_peers=swarm.initial_peers
        )
        local = AutoModelForCausalLM.from_pretrained(model_path).eval()
        drafts = {"same": local, "noisy": noisy_copy(local)}
        yield distributed, local, drafts, swarm
        distributed.close()
    finally:
        swarm.stop()


def speculate(distributed, speculation: Speculation, new_tokens: int = 24, **kwargs) -> list[int]:
    output = distributed.generate(
        PROMPT, max_new_tokens=new_tokens, do_sample=False, speculation=speculation, **kwargs
    )
    return output[0, PROMPT.shape[1] :].tolist()


@pytest.mark.parametrize("drafts", ["ngram", "same", "noisy"])
def test_greedy_speculation_gives_exactly_the_tokens_of_plain_decoding(setup, drafts):
    distributed, local, models, _ = setup
    expected = local.generate(PROMPT, max_new_tokens=24, do_sample=False)[0, PROMPT.shape[1] :].tolist()
    if drafts == "ngram":
        speculation = Speculation("ngram", draft_tokens=4, adaptive=False)
    else:
        speculation = Speculation("model", draft_tokens=4, draft_model=models[drafts], adaptive=False)
    assert speculate(distributed, speculation) == expected
    stats = speculation.stats
    assert stats.drafted > 0 and stats.tokens == 24
    if drafts == "same":  # a draft model equal to the target: every draft kept, several tokens a trip
        assert stats.accepted == stats.drafted and stats.trips < 12
    else:  # drafts that missed: the servers rolled back what they had cached for them
        assert stats.accepted < stats.drafted


def test_adaptive_draft_length_stops_drafting_what_never_hits_and_stays_exact(setup):
    distributed, local, models, _ = setup
    expected = local.generate(PROMPT, max_new_tokens=40, do_sample=False)[0, PROMPT.shape[1] :].tolist()
    speculation = Speculation("model", draft_tokens=6, draft_model=models["noisy"])
    assert speculate(distributed, speculation, new_tokens=40) == expected
    fixed = Speculation("model", draft_tokens=6, draft_model=models["noisy"], adaptive=False)
    speculate(distributed, fixed, new_tokens=40)
    # drafts of the noisy model often miss: the adaptive length drafts far fewer tokens for the same output
    assert speculation.stats.drafted < fixed.stats.drafted / 2


def _chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Goodness of fit of ``counts`` to ``probabilities`` (bins expected below 5 merged into one)."""
    expected = probabilities * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    expected = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    statistic = ((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum()
    degrees = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(degrees, statistic.double() / 2))


def test_speculative_sampling_keeps_the_models_distribution(setup):
    distributed, local, models, _ = setup
    temperature, samples = 0.7, 200
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    vocab = local.config.vocab_size
    counts = torch.zeros(2, vocab, dtype=torch.float64)
    torch.manual_seed(0)
    stats = SpeculationStats()
    for _ in range(samples):
        speculation = Speculation("model", draft_tokens=2, draft_model=models["noisy"], adaptive=False, stats=stats)
        output = distributed.generate(PROMPT, max_new_tokens=3, speculation=speculation, **sampling)
        first, second = output[0, PROMPT.shape[1] : PROMPT.shape[1] + 2].tolist()
        counts[0, first] += 1
        counts[1, second] += 1
    # the exact marginals of the first two new tokens, from the local model
    with torch.no_grad():
        p_first = torch.softmax(local(PROMPT).logits[0, -1].double() / temperature, -1)
        continued = torch.cat([PROMPT.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        p_next = torch.softmax(local(continued).logits[:, -1].double() / temperature, -1)
    p_second = p_first @ p_next
    assert stats.drafted > stats.accepted > 0  # drafts were kept, and drafts were rejected
    assert _chi_square_p_value(counts[0], p_first) > 1e-3
    assert _chi_square_p_value(counts[1], p_second) > 1e-3
    # and the test can tell: the draft model's own distribution of the first token is not the target's
    with torch.no_grad():
        q_first = torch.softmax(models["noisy"](PROMPT).logits[0, -1].double() / temperature, -1)
    assert _chi_square_p_value(counts[0], q_first) < 1e-3


class _KillAt:
    """A streamer that SIGKILLs the server of the session's last span once ``at`` tokens have come."""

    def __init__(self, swarm, session, at: int):
        self.swarm, self.session, self.at, self.count, self.killed = swarm, session, at, 0, ""

    def put(self, value):
        before, self.count = self.count, self.count + value.numel()
        if before > PROMPT.shape[1] and before < self.at <= self.count:
            self.killed = self.session.route[-1].peer_id
            server = next(s for s in self.swarm.servers if s.addresses()[0].endswith(self.killed))
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()

    def end(self):
        pass


def test_a_server_killed_between_checked_blocks_of_drafts_fails_over_exactly(setup):
    """Last in this module: it kills one of the two servers of the last span."""
    distributed, local, models, swarm = setup
    expected = local.generate(PROMPT, max_new_tokens=30, do_sample=False)[0, PROMPT.shape[1] :].tolist()
    speculation = Speculation("model", draft_tokens=4, draft_model=models["noisy"], adaptive=False)
    with distributed.inference_session(max_length=PROMPT.shape[1] + 30) as session:
        streamer = _KillAt(swarm, session, PROMPT.shape[1] + 10)
        output = distributed.generate(
            PROMPT, max_new_tokens=30, do_sample=False, speculation=speculation, session=session, streamer=streamer
        )
        assert streamer.killed and session.failovers >= 1
        assert streamer.killed not in {span.peer_id for span in session.route}
    assert output[0, PROMPT.shape[1] :].tolist() == expected
    assert 0 < speculation.stats.accepted < speculation.stats.drafted  # drafts kept and drafts rolled back
