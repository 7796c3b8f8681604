"""Every model family through a real 3-server swarm with uneven spans equals the same model run locally.

Llama and BLOOM have the same checks (and more) in test_exactness.py; here ``llama3`` stands for Llama with
Llama 3 rope scaling. Families with a sliding window or rope scaling also run a session that grows past the
window or the original context while it generates, so caches evict and scaled frequencies are reached.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from petals_cli import AutoDistributedModelForCausalLM
from petals_cli.testing import make_tiny_model
from petals_cli.testing.models import LLAMA3_ROPE, TINY_SLIDING_WINDOW
from tests.conftest import Swarm
from tests.swarm.checks import assert_input_gradients_match

pytestmark = pytest.mark.slow
NUM_LAYERS = 5
SPANS = ("0:1", "1:3", f"3:{NUM_LAYERS}")
FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "mixtral", "falcon", "falcon-7b", "falcon-rw", "gemma")
CONTEXT_LIMIT = {  # tokens after which the family's long-context behaviour starts
    "llama3": LLAMA3_ROPE["original_max_position_embeddings"],
    "mistral": TINY_SLIDING_WINDOW,
    "qwen2": TINY_SLIDING_WINDOW,
    "qwen3": TINY_SLIDING_WINDOW,
}
PROMPT = "A swarm of small servers runs one large model"  # longer than the sliding window: prefill crosses it
SHORT_PROMPT = "Once"  # shorter than any limit: the session crosses it while generating


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    model = make_tiny_model(
        tmp_path_factory.mktemp("models") / f"tiny-{request.param}", request.param, num_layers=NUM_LAYERS
    )
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many(*SPANS)
        distributed = AutoDistributedModelForCausalLM.from_pretrained(str(model), initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(model).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        yield request.param, distributed, local, tokenizer
        distributed.close()
    finally:
        swarm.stop()


def test_greedy_generation_equals_local(setup):
    _, distributed, local, tokenizer = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    remote = distributed.generate(input_ids, max_new_tokens=24, do_sample=False)
    reference = local.generate(input_ids, max_new_tokens=24, do_sample=False)
    assert remote.tolist() == reference.tolist()
    assert len(set(remote[0, input_ids.shape[1] :].tolist())) > 4, "degenerate test model"


def test_logits_match_in_forward_and_in_generation_steps(setup):
    _, distributed, local, tokenizer = setup
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(distributed(input_ids).logits, local(input_ids).logits, atol=1e-4, rtol=1e-5)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    remote = distributed.generate(input_ids, **kwargs)
    reference = local.generate(input_ids, **kwargs)
    for remote_step, reference_step in zip(remote.logits, reference.logits, strict=True):
        torch.testing.assert_close(remote_step, reference_step, atol=1e-4, rtol=1e-5)


def test_gradients_wrt_input_embeddings_match_local_autograd(setup):
    _, distributed, local, tokenizer = setup
    assert_input_gradients_match(distributed, local, tokenizer, PROMPT)


def test_session_growing_past_the_window_or_original_context_equals_local(setup):
    family, distributed, local, tokenizer = setup
    if family not in CONTEXT_LIMIT:
        pytest.skip(f"{family} has no sliding window or rope scaling")
    input_ids = tokenizer(SHORT_PROMPT, return_tensors="pt").input_ids
    new_tokens = 2 * CONTEXT_LIMIT[family]
    assert input_ids.shape[1] < CONTEXT_LIMIT[family] < input_ids.shape[1] + new_tokens
    with distributed.inference_session(max_length=input_ids.shape[1] + new_tokens) as session:
        first = distributed.generate(input_ids, max_new_tokens=new_tokens // 2, do_sample=False, session=session)
        remote = distributed.generate(first, max_new_tokens=new_tokens // 2, do_sample=False, session=session)
    reference = local.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
    assert remote.tolist() == reference.tolist()
