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
