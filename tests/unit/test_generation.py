from petals_cli.generation import _StoppingTextStreamer, cut_at_stop


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
    from petals_cli.bench import BenchReport, Measurement

    report = BenchReport(model="m", config={})
    report.swarm = {"rate": Measurement("rate", "steps/s", 8.0, 7.0, 9.0), "time": Measurement("t", "s", 2.0, 2, 2)}
    report.local = {"rate": Measurement("rate", "steps/s", 10.0, 9.0, 11.0), "time": Measurement("t", "s", 1.0, 1, 1)}
    assert report.ratios() == {"rate": 0.8, "time": 0.5}
