import pytest

from petals_cli.errors import InvalidRequestError, ProtocolMismatchError
from petals_cli.wire import (
    MAX_ITEMS,
    MAX_TEXT,
    PROTOCOL_VERSION,
    ServerInfo,
    ServerState,
    SpanRequest,
    model_prefix_for,
)


def test_server_info_round_trip_keeps_every_field():
    info = ServerInfo(
        state=ServerState.ONLINE, start_block=2, end_block=5, version="0.1.0", cache_tokens_left=100, public_name="x"
    )
    assert ServerInfo.from_wire(info.to_wire()) == info


def test_unknown_fields_are_tolerated():
    wire = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=1, version="v").to_wire()
    wire["added_by_a_newer_peer"] = [1, 2]
    assert ServerInfo.from_wire(wire).end_block == 1


@pytest.mark.parametrize(
    "field, value",
    [("start_block", "0"), ("start_block", True), ("state", 7), ("version", 3), ("adapters", "lora")],
)
def test_wrong_types_raise_a_typed_error(field, value):
    wire = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=1, version="v").to_wire()
    wire[field] = value
    with pytest.raises(InvalidRequestError):
        ServerInfo.from_wire(wire)


def test_missing_required_field_and_non_mapping_are_rejected():
    with pytest.raises(InvalidRequestError, match="missing field 'prefix'"):
        SpanRequest.from_wire({"protocol": 1, "start_block": 0, "end_block": 1})
    with pytest.raises(InvalidRequestError):
        SpanRequest.from_wire([1, 2, 3])


def test_protocol_mismatch_is_a_clear_error():
    request = SpanRequest(protocol=PROTOCOL_VERSION + 1, prefix="m", start_block=0, end_block=1)
    with pytest.raises(ProtocolMismatchError, match="protocol"):
        request.check_protocol()


def test_model_prefix_is_the_sanitised_last_component():
    assert model_prefix_for("/tmp/models/tiny-llama/") == "tiny-llama"
    assert model_prefix_for("bigscience/bloom-560m") == "bloom-560m"
    assert model_prefix_for("org/weird name!") == "weird-name-"


def test_prompt_and_adapter_fields_default_for_older_peers_and_round_trip():
    from petals_cli.wire import StepRequest

    old = {"protocol": PROTOCOL_VERSION, "prefix": "m", "start_block": 0, "end_block": 2}
    request = SpanRequest.from_wire(old)
    assert request.prompts is False and request.adapter == ""
    request = SpanRequest(PROTOCOL_VERSION, "m", 0, 2, prompts=True, adapter="lora")
    assert SpanRequest.from_wire(request.to_wire()) == request
    assert StepRequest.from_wire({"position": 3}).prompts is False
    with pytest.raises(InvalidRequestError):
        StepRequest.from_wire({"position": 3, "prompts": "yes"})
    with pytest.raises(InvalidRequestError):
        SpanRequest.from_wire({**old, "adapter": 5})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("public_name", "x" * (MAX_TEXT + 1)),
        ("version", "1" * (MAX_TEXT + 1)),
        ("adapters", ["a"] * (MAX_ITEMS + 1)),
        ("adapters", ["a" * (MAX_TEXT + 1)]),
        ("pings", {str(index): 0.1 for index in range(MAX_ITEMS + 1)}),
    ],
    ids=["name", "version", "many adapters", "long adapter", "many pings"],
)
def test_oversized_strings_and_lists_are_refused_when_a_record_is_read(field, value):
    record = ServerInfo(state=ServerState.ONLINE, start_block=0, end_block=1, version="0.1.0").to_wire()
    with pytest.raises(InvalidRequestError, match=field):
        ServerInfo.from_wire(record | {field: value})
    assert ServerInfo.from_wire(record | {"public_name": "x" * MAX_TEXT}).public_name == "x" * MAX_TEXT
