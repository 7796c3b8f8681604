"""Generated text shown safely: one line per result in `generate --prompts-file`, no raw control characters in chat."""

import threading

import pytest

from petals_cli.textsafe import escape_line, for_terminal, shown, unescape_line

NASTY = [
    "two\nlines",
    "crlf\r\nand a lone \r",
    "tab\there, backslash \\ and a literal \\n",
    "\x1b[31mred\x1b[0m bell\x07 back\x08space del\x7f nul\x00 csi\x9b",
    "separators\u2028\u2029 and \x0b\x0c\x1c\x85",
    "non-ASCII: é ß 日本 🙂 \ud800",
    "",
]


@pytest.mark.parametrize("text", NASTY)
def test_an_escaped_line_is_one_line_of_printable_text_and_reverses_exactly(text):
    line = escape_line(text)
    assert len(f"{line}\n".splitlines()) == 1
    assert not any(char < " " or "\x7f" <= char <= "\x9f" for char in line)
    assert unescape_line(line) == text


def test_line_escapes_are_the_documented_ones():
    assert escape_line("a\\b\nc\rd\te") == "a\\\\b\\nc\\rd\\te"
    assert escape_line("\x1b[1m\x7f\x9b\u2028é") == "\\x1b[1m\\x7f\\x9b\\u2028é"


def test_the_terminal_sees_newlines_and_tabs_and_every_other_control_as_an_escape():
    assert for_terminal("line\n\tindented") == "line\n\tindented"
    assert for_terminal("\x1b[2J\x07\x08\r\x7f\x9b\x00") == "\\x1b[2J\\x07\\x08\\x0d\\x7f\\x9b\\x00"
    assert for_terminal("é 🙂 \\x1b") == "é 🙂 \\x1b"  # a backslash the model wrote is left alone


def test_no_piece_boundary_smuggles_a_control_character_to_the_terminal():
    text = "".join(NASTY)
    for cut in range(len(text) + 1):
        shown = for_terminal(text[:cut]) + for_terminal(text[cut:])
        assert shown == for_terminal(text)
        assert not any((char < " " and char not in "\n\t") or "\x7f" <= char <= "\x9f" for char in shown)


def test_generate_prompts_file_prints_one_escaped_line_per_result(monkeypatch, tmp_path, capsys):
    import petals_cli.generation
    from petals_cli.commands import generate as command
    from petals_cli.generation import GenerationResult

    texts = ["first\nsecond", "\x1b[31mred\\", ""]
    closed = []
    fake_model = type("FakeModel", (), {"close": lambda self: closed.append(True)})()
    monkeypatch.setattr(command, "open_model_with_feedback", lambda *args, **kwargs: (fake_model, None))
    monkeypatch.setattr(
        petals_cli.generation,
        "generate_batch",
        lambda model, tokenizer, prompts, options: [GenerationResult(text) for text in texts[: len(prompts)]],
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    command.generate(model="tiny", prompts_file=str(prompts))
    lines = capsys.readouterr().out.splitlines()
    assert [unescape_line(line) for line in lines] == texts
    assert closed == [True]


def test_chat_streams_the_reply_with_control_characters_escaped(capsys):
    from petals_cli.commands.chat import _reply

    class FakeConversation:
        stop = threading.Event()

        def reply(self, text, on_text):
            for piece in ["\x1b", "[2J wiped?", "\x07\r ok\n\tdone"]:
                on_text(piece)

    _reply(FakeConversation(), "hello")
    assert capsys.readouterr().out == "\\x1b[2J wiped?\\x07\\x0d ok\n\tdone\n"


@pytest.mark.parametrize("terminal", [False, True])
def test_generate_prints_one_prompt_as_it_is_but_escapes_controls_on_a_terminal(monkeypatch, capsys, terminal):
    import sys

    import petals_cli.generation
    from petals_cli.commands import generate as command
    from petals_cli.generation import GenerationResult

    text = "\x1b[1mbold\x1b[0m\nsecond line\r"

    def fake_generate(model, tokenizer, prompt, options, on_text=None):
        for piece in (text[:1], text[1:]) if on_text else ():
            on_text(piece)
        return GenerationResult(text)

    fake_model = type("FakeModel", (), {"close": lambda self: None})()
    monkeypatch.setattr(command, "open_model_with_feedback", lambda *args, **kwargs: (fake_model, None))
    monkeypatch.setattr(petals_cli.generation, "generate", fake_generate)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)  # a terminal also turns streaming on
    command.generate(model="tiny", prompt="hi")
    assert capsys.readouterr().out == (for_terminal(text) if terminal else text) + "\n"


def test_what_another_peer_says_is_shown_as_one_bounded_line():
    assert shown("fast\x1b[2J box\nnext\x07") == "fast\\x1b[2J box\\nnext\\x07"
    long = shown("x" * 5000)
    assert len(long) == 200 and long.endswith("…")
    assert shown("[bold]name[/bold]") == "[bold]name[/bold]"  # markup is the renderer's to escape
