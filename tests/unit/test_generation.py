import pytest

from petals_cli.errors import ConfigError
from petals_cli.generation import GenerationOptions, _StoppingTextStreamer, cut_at_stop


def test_cut_at_stop_takes_the_earliest_stop_sequence():
    assert cut_at_stop("hello world. bye", (".", "wor")) == "hello "
    assert cut_at_stop("no stops here", ("###",)) == "no stops here"
    assert cut_at_stop("text", ()) == "text"


def test_streamer_holds_back_a_possible_stop_and_never_prints_it():
    shown = []
    streamer = _StoppingTextStreamer(tokenizer=None, on_text=shown.append, stop=("END",))
    for piece in ["Hello", " wor", "ld E", "N", "D and more"]:
        streamer._collect(piece)
    streamer.end()
    assert "".join(shown) == "Hello world "


def test_streamer_flushes_the_held_tail_when_no_stop_comes():
    shown = []
    streamer = _StoppingTextStreamer(tokenizer=None, on_text=shown.append, stop=("END",))
    for piece in ["abc", "EN"]:
        streamer._collect(piece)
    assert "".join(shown) == "abc"  # "EN" might still become "END"
    streamer.end()
    assert "".join(shown) == "abcEN"


def test_bench_ratios_read_rates_and_times_the_right_way_round():
    from petals_cli.measurements import BenchReport, Measurement

    report = BenchReport(model="m", config={})
    report.swarm = {"rate": Measurement("rate", "steps/s", 8.0, 7.0, 9.0), "time": Measurement("t", "s", 2.0, 2, 2)}
    report.local = {"rate": Measurement("rate", "steps/s", 10.0, 9.0, 11.0), "time": Measurement("t", "s", 1.0, 1, 1)}
    assert report.ratios() == {"rate": 0.8, "time": 0.5}


def test_read_prompts_takes_lines_or_json_lines(tmp_path):
    from petals_cli.generation import read_prompts

    plain = tmp_path / "prompts.txt"
    plain.write_text("first prompt\n\n  second one\n")
    assert read_prompts(str(plain)) == ["first prompt", "  second one"]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a\\nb"}\n"plain string"\n{"text": "from text"}\n')
    assert read_prompts(str(jsonl)) == ["a\nb", "plain string", "from text"]


def test_read_prompts_names_the_bad_line(tmp_path):
    import pytest

    from petals_cli.errors import ConfigError
    from petals_cli.generation import read_prompts

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"other": 1}\n')
    with pytest.raises(ConfigError, match="prompts.jsonl:2"):
        read_prompts(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_a_finished_batch_row_is_trimmed_like_the_prompt_alone():
    from petals_cli.generation import _trim_finished

    assert _trim_finished([5, 6, 2, 2, 2], eos_id=2, pad_id=2) == [5, 6, 2]
    assert _trim_finished([5, 6, 0, 0], eos_id=2, pad_id=0) == [5, 6]  # stopped by a stop string, then padded
    assert _trim_finished([5, 6, 7], eos_id=2, pad_id=0) == [5, 6, 7]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", 0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("top_p", 5.0),
        ("top_k", -1),
        ("repetition_penalty", 0.0),
    ],
)
def test_generation_options_refuse_values_generation_cannot_use(field, value):
    # the flags of generate/chat and chat's /params share this check
    with pytest.raises(ConfigError, match=field.replace("_", " ")):
        GenerationOptions(**{field: value})
    assert GenerationOptions().repetition_penalty == 1.0
