"""OpenAI request bodies to generation requests, and results to OpenAI shapes (no network)."""

import pytest

from petals_cli.api_requests import ApiError, Choice, ResponseIds, completion_json, parse_request, usage_json
from petals_cli.generation import TokenLogprob


def parse(**body):
    return parse_request({"model": "m", "prompt": "p", **body}, chat=False, tokenizer=None, model_names=("m",))


def refused(**body) -> ApiError:
    with pytest.raises(ApiError) as error:
        parse(**body)
    assert error.value.status == 400
    return error.value


def test_prompt_lists_give_n_choices_each_with_their_own_seeds():
    request = parse(prompt=["a", "b"], n=2, seed=5, temperature=0.7)
    plans = request.choices()
    assert [(index, prompt_index, prompt) for index, prompt_index, prompt, _ in plans] == [
        (0, 0, "a"),
        (1, 0, "a"),
        (2, 1, "b"),
        (3, 1, "b"),
    ]
    assert [options.seed for *_, options in plans] == [5, 6, 7, 8]
    assert {options.temperature for *_, options in plans} == {0.7}
    assert [options.seed for *_, options in parse().choices()] == [None]


def test_bad_prompts_logprobs_and_choice_counts_name_their_field():
    assert refused(prompt=[1, 2]).param == "prompt" and "token-id" in str(refused(prompt=[[1], [2]]))
    assert refused(prompt=[]).param == "prompt" and refused(prompt=["a", 3]).param == "prompt"
    assert refused(logprobs=6).param == "logprobs" and refused(logprobs=True).param == "logprobs"
    assert refused(n=17).param == "n" and refused(prompt=["a"] * 5, n=16).param == "prompt"
    assert parse(logprobs=0).logprobs == 0 and parse().logprobs is None and parse(logprobs=5).logprobs == 5


def test_chat_logprobs_is_a_switch_and_top_logprobs_its_count():
    def chat(**body):
        messages = [{"role": "user", "content": "hi"}]
        tokenizer = type("Plain", (), {"chat_template": None})()
        return parse_request(
            {"model": "m", "messages": messages, **body}, chat=True, tokenizer=tokenizer, model_names=("m",)
        )

    assert chat().logprobs is None and chat(logprobs=True).logprobs == 0
    assert chat(logprobs=True, top_logprobs=20).logprobs == 20
    for body in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}, {"logprobs": 1}):
        with pytest.raises(ApiError) as error:
            chat(**body)
        assert error.value.param in ("logprobs", "top_logprobs")


def test_usage_counts_each_prompt_once_and_logprobs_take_openais_shapes():
    entries = [TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.5))), TokenLogprob(2, -2.0, ((3, -0.1), (2, -2.0)))]
    choices = [Choice("ab", 2, "length", 3, 0, entries), Choice("ab", 2, "length", 3, 0, entries)]
    choices.append(Choice("c", 1, "stop", 4, 1, None))
    assert usage_json(choices) == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    text = {1: "a", 2: "b", 3: "c"}.__getitem__
    plain = completion_json(ResponseIds(False, "m"), choices, text)["choices"]
    assert plain[0]["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"a": -0.5, "b": -1.5}, {"c": -0.1, "b": -2.0}],
        "text_offset": [0, 1],
    }
    assert plain[2]["logprobs"] is None
    chat = completion_json(ResponseIds(True, "m"), choices[:1], text)["choices"][0]["logprobs"]["content"]
    assert chat[1] == {
        "token": "b",
        "logprob": -2.0,
        "bytes": [98],
        "top_logprobs": [
            {"token": "c", "logprob": -0.1, "bytes": [99]},
            {"token": "b", "logprob": -2.0, "bytes": [98]},
        ],
    }
