"""`petals chat` driven through a real pseudo-terminal against a real swarm."""

import os
import re
import sys

import pexpect
import pytest

from petals_cli.commands.chat import HELP
from petals_cli.testing import make_tiny_model
from tests.conftest import Swarm

pytestmark = pytest.mark.slow
PROMPT = "> "


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat", "llama", num_layers=4)
    swarm = Swarm(model=model, workdir=tmp_path_factory.mktemp("swarm"))
    try:
        swarm.start_many("0:2", "2:4")
        yield swarm
    finally:
        swarm.stop()


def spawn_chat(swarm, *args):
    command = [sys.executable, "-m", "petals_cli.commands", "chat", str(swarm.model), *args]
    command += ["--initial-peers", *swarm.initial_peers]
    chat = pexpect.spawn(command[0], command[1:], env=dict(os.environ), encoding="utf-8", timeout=90)
    chat.expect_exact(PROMPT)
    return chat


def sessions_opened(swarm) -> int:
    return sum(server.log().count(" opened: ") for server in swarm.servers)


def stats(chat) -> tuple[int, int]:
    chat.sendline("/stats")
    chat.expect(r"context (\d+)/\d+ tokens on the servers; last turn sent (\d+) new tokens")
    position, sent = int(chat.match.group(1)), int(chat.match.group(2))
    chat.expect_exact(PROMPT)
    return position, sent


def test_two_turns_reuse_one_session_and_reset_opens_a_new_one(swarm):
    opened_before = sessions_opened(swarm)
    chat = spawn_chat(swarm, "--max-new-tokens", "12")
    chat.sendline("Hello there, swarm")
    chat.expect_exact(PROMPT)
    first_position, first_sent = stats(chat)
    assert first_sent > 0 and first_position >= first_sent
    chat.sendline("And a second question")
    chat.expect_exact(PROMPT)
    second_position, second_sent = stats(chat)
    assert second_sent < first_position, "the second turn must send only its new tokens"
    assert second_position > first_position
    assert sessions_opened(swarm) == opened_before + 2  # one session, held by each of the 2 servers
    chat.sendline("/reset")
    chat.expect_exact("conversation reset")
    chat.expect_exact(PROMPT)
    assert stats(chat) == (0, 0), "a reset conversation reports a fresh state"
    replies = [
        ("/foo", "unknown command /foo; commands: "),
        ("/save", "/save needs a file name; "),
        ("/save /nonexistent/chat.json", "cannot save to /nonexistent/chat.json: "),  # and the chat goes on
    ]
    for command, answer in replies:
        chat.sendline(command)
        chat.expect_exact(answer)
        chat.expect_exact(PROMPT)
    chat.sendline("/help")
    chat.expect_exact(HELP)
    assert "unknown" not in chat.before
    chat.expect_exact(PROMPT)
    chat.sendline("A fresh start")
    chat.expect_exact(PROMPT)
    assert sessions_opened(swarm) == opened_before + 4
    chat.sendline("/exit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(swarm):
    chat = spawn_chat(swarm, "--max-new-tokens", "3000", "--max-length", "4096")
    chat.sendline("Tell me a very long story")
    chat.expect_exact("Tell me a very long story\r\n")  # the terminal's echo of the line
    chat.expect(re.compile(r".{20}", re.DOTALL))  # twenty characters of the reply have streamed in
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect_exact(PROMPT)
    chat.sendline("/params max_tokens=8")
    chat.expect_exact("max_tokens=8")
    chat.expect_exact(PROMPT)
    chat.sendline("Still there?")
    chat.expect_exact(PROMPT)
    position, sent = stats(chat)
    assert 0 < sent < position
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
