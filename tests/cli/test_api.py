"""`petals api`: the OpenAI-compatible endpoint, spoken to by the real `openai` package over real HTTP.

One real server holds both blocks of a tiny model; the API apps are built in this process with ``make_app`` around
one opened distributed model and served by uvicorn on 127.0.0.1 (a free port) in background threads. Greedy
answers must equal ``generation.generate`` on the same prompt, streamed or not, alone or eight at once; and, so that
the code the API calls is not its own reference, greedy and seeded sampled answers equal transformers' ``generate``
on the same model, run locally.
"""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from petals_cli.api_requests import render_chat
from petals_cli.config import ClientConfig
from petals_cli.generation import GenerationOptions, generate, open_model
from petals_cli.testing import make_tiny_model
from tests.cli.inprocess import run_here
from tests.conftest import Swarm

KEY = "sk-test"
MODEL = "tiny"
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWSgkAoWJFgBH71fVzHEnTqmJ45a7xqon4oLTzn8oSgPsN"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(["--port", "70000"], "--port"), (["--host", "localhost"], "--host"), (["--max-concurrent", "0"], "concurrent")],
)
def test_bad_flags_are_one_line_and_exit_2(flags, fragment, monkeypatch, capsys):
    result = run_here(monkeypatch, capsys, "api", "some-model", *flags, "--initial-peers", UNREACHABLE)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr


def http(method: str, url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict, str]:
    """Plain HTTP: status, headers, body text (error statuses included)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def health(served) -> tuple[int, dict]:
    status, _, text = http("GET", f"{served.url}/health")
    return status, json.loads(text)


class Served:
    """An app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def client(self, api_key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("api") / "tiny", "llama", num_layers=2)
    swarm = Swarm(model=path, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start("0:2")
        yield swarm
    finally:
        swarm.stop()


@pytest.fixture(scope="module")
def opened(swarm):
    model, tokenizer = open_model(str(swarm.model), ClientConfig(initial_peers=tuple(swarm.initial_peers)))
    try:
        yield model, tokenizer
    finally:
        model.close()


@pytest.fixture(scope="module")
def served(opened):
    from petals_cli.api import make_app

    model, tokenizer = opened
    keyed = Served(make_app(model, tokenizer, model_name=MODEL, api_key=KEY, max_concurrent=8))
    narrow = Served(make_app(model, tokenizer, model_name=MODEL, max_concurrent=1))
    yield keyed, narrow
    keyed.stop()
    narrow.stop()


def expected(opened, prompt: str, max_tokens: int, stop=()):
    model, tokenizer = opened
    return generate(model, tokenizer, prompt, GenerationOptions(max_new_tokens=max_tokens, stop=tuple(stop)))


@pytest.fixture(scope="module")
def local(swarm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(swarm.model).eval()


def local_tokens(local, tokenizer, prompt: str, max_tokens: int, seed: int | None = None, **sampling) -> list[int]:
    """The new tokens of transformers' own generate() on the local model: greedy, or with ``seed`` sampled as an
    OpenAI request asks (torch's generator seeded with the choice's seed; top_k=0: the API has no top-k)."""
    import torch

    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    if seed is None:
        kwargs = dict(do_sample=False)
    else:
        torch.manual_seed(seed)
        kwargs = dict(do_sample=True, top_k=0, **sampling)
    output = local.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens, **kwargs)
    return output[0, input_ids.shape[1] :].tolist()


@pytest.mark.slow
def test_chat_equals_greedy_generation_streamed_or_not(opened, served):
    client = served[0].client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two three"}]
    prompt, stops = render_chat(opened[1], messages)
    assert prompt == "Be brief.\nUser: one two three\nAssistant:" and stops == ("\nUser:",)  # no template
    want = expected(opened, prompt, 10, stops)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == want.text and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == want.prompt_tokens and reply.usage.completion_tokens == want.new_tokens
    assert reply.usage.total_tokens == want.prompt_tokens + want.new_tokens
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.object == "chat.completion"

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)


@pytest.mark.slow
def test_completions_usage_length_and_stop(opened, served, local):
    client = served[0].client()
    prompt = "one two three one two"
    want = expected(opened, prompt, 12)
    assert want.token_ids == local_tokens(local, opened[1], prompt, 12)  # the reference is transformers' too
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == want.text and reply.object == "text_completion"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert reply.choices[0].finish_reason == ("stop" if want.token_ids[-1] == opened[1].eos_token_id else "length")
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(chunk.choices[0].text for chunk in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    visible = want.text.strip()
    assert len(visible) >= 4, want.text  # the tiny model's weights are large enough to say something
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    cut = expected(opened, prompt, 12, [stop])
    assert stop not in cut.text and len(cut.text) < len(want.text)
    for stream in (False, True):
        result = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=stream
        )
        chunks = list(result) if stream else [result]
        assert "".join(chunk.choices[0].text for chunk in chunks) == cut.text
        assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_errors_are_openai_shaped(served):
    keyed, narrow = served
    client = keyed.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"frequency_penalty": 0.5})
    assert refused.value.body["param"] == "frequency_penalty" and refused.value.body["type"] == "invalid_request_error"
    for field, value in (("max_tokens", -1), ("temperature", -0.5), ("top_p", 1.5)):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="x", **{"max_tokens": 2, field: value})
        assert refused.value.body["param"] == field
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="token-id") as refused:
        client.completions.create(model=MODEL, prompt=[1, 2, 3])
    assert refused.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        keyed.client(api_key="wrong").models.list()
    assert [entry.id for entry in client.models.list().data] == [MODEL]
    status, report = health(keyed)  # open without a key
    assert status == 200 and report["status"] == "ok" and report["missing_blocks"] == []

    busy = narrow.client()
    first = busy.completions.create(model=MODEL, prompt="one", max_tokens=60, temperature=0, stream=True)
    next(iter(first))  # the one slot is taken while this stream runs
    with pytest.raises(openai.RateLimitError):
        busy.completions.create(model=MODEL, prompt="two", max_tokens=2)
    first.close()  # leaving mid-stream stops the generation and frees the slot
    deadline = time.monotonic() + 10
    while health(narrow)[1]["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy.completions.create(model=MODEL, prompt="two", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.slow
def test_server_sent_events_are_framed_as_openai_does(served):
    keyed = served[0]
    body = {"model": MODEL, "prompt": "one two", "max_tokens": 4, "temperature": 0, "stream": True}
    status, headers, text = http("POST", f"{keyed.url}/v1/completions", body, key=KEY)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert text.endswith("\n\n")
    events = text[: -len("\n\n")].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), text
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"]


@pytest.mark.slow
def test_eight_concurrent_streams_each_equal_their_own_greedy_answer(opened, served):
    client = served[0].client()
    prompts = [f"{word} one two three" for word in ("a", "b", "c", "d", "e", "f", "g", "h")]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(stream, prompts))
    assert texts == [expected(opened, prompt, 6).text for prompt in prompts]


@pytest.mark.slow
def test_logprobs_equal_the_local_models_streamed_or_not(opened, served, local):
    import torch

    client, tokenizer = served[0].client(), opened[1]
    messages = [{"role": "user", "content": "one two three"}]
    prompt, _ = render_chat(tokenizer, messages)
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    reference = local.generate(
        input_ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = reference.sequences[0, input_ids.shape[1] :].tolist()
    want = [torch.log_softmax(logits[0].float(), -1) for logits in reference.logits]

    kwargs = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    for entries in (reply.choices[0].logprobs.content, streamed):
        assert [entry.token for entry in entries] == [tokenizer.decode([token]) for token in tokens]
        for entry, token, row in zip(entries, tokens, want, strict=True):
            assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
            best = row.topk(3)
            assert [top.token for top in entry.top_logprobs] == [tokenizer.decode([i]) for i in best.indices.tolist()]
            assert [top.logprob for top in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy took the likeliest

    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(
        [float(row[t]) for row, t in zip(want, tokens, strict=True)], abs=1e-4
    )
    assert "".join(logprobs.tokens) == tokenizer.decode(tokens)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)  # two tokens may read alike
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(tokens))]


@pytest.mark.slow
def test_prompt_lists_and_n_run_at_once_and_seeds_repeat(opened, served, local):
    client = served[0].client()
    prompts = ["one two three", "three two one"]
    body = dict(model=MODEL, prompt=prompts, n=2, max_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    reply = client.completions.create(**body)
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    tokenizer = opened[1]
    # choice i of a request with seed s samples with seed s + i
    sampled = [
        local_tokens(local, tokenizer, prompts[index // 2], 8, seed=11 + index, temperature=0.9, top_p=0.95)
        for index in range(4)
    ]
    want = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in sampled]
    assert [choice.text for choice in reply.choices] == want
    assert len(set(want)) > 1  # seeds 11..14 sample differently
    assert reply.usage.prompt_tokens == sum(len(tokenizer(prompt).input_ids) for prompt in prompts)
    assert reply.usage.completion_tokens == sum(len(tokens) for tokens in sampled)
    texts = {}
    for chunk in client.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert [texts[index] for index in range(4)] == want


@pytest.mark.slow
def test_a_dead_swarm_is_a_503_with_the_typed_errors_message(swarm, opened):
    from petals_cli.api import make_app

    extra = swarm.start("0:2")
    peer = extra.addresses()[0].rsplit("/p2p/", 1)[1]
    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), allowed_servers=(peer,), route_wait=1.0)
    model, tokenizer = open_model(str(swarm.model), config)
    served = Served(make_app(model, tokenizer, model_name=MODEL))
    try:
        client = served.client()
        assert client.completions.create(model=MODEL, prompt="one", max_tokens=2).usage.completion_tokens == 2
        extra.process.kill()
        extra.process.wait()
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as failed:
                list(client.completions.create(model=MODEL, prompt="one", max_tokens=2, stream=stream) or [])
            assert failed.value.status_code == 503 and failed.value.body["type"] == "service_unavailable"
            assert failed.value.body["message"]
        status, report = health(served)
        assert status == 503 and report["status"] == "unavailable" and report["missing_blocks"] == [0, 1]
    finally:
        served.stop()
        model.close()
