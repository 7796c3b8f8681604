import asyncio

import torch
from hivemind.p2p import PeerID

from petals_cli import transport
from petals_cli.errors import InvalidRequestError
from petals_cli.wire import StepResponse


def test_rpcs_are_registered_with_the_right_streaming_modes():
    transport.BlocksService._collect_rpc_handlers()
    modes = {
        handler.method_name: (handler.stream_input, handler.stream_output)
        for handler in transport.BlocksService._rpc_handlers
    }
    assert modes == {
        "rpc_inference": (True, True),
        "rpc_forward": (True, True),
        "rpc_backward": (True, True),
        "rpc_push": (False, False),
        "rpc_push_stream": (True, True),  # one answer, on a stream its client closes
        "rpc_info": (False, False),
    }


async def _as_stream(messages):
    for message in messages:
        yield message


def test_large_tensors_are_split_and_reassembled_exactly():
    import asyncio

    tensors = [torch.randn(3, 700, 256), torch.randn(2, 5)]
    messages = transport.request_messages(tensors, b"meta")
    assert len(messages) > 2
    received, metadata = asyncio.run(transport.collect_tensors(_as_stream(messages)))
    assert metadata == b"meta"
    assert all(torch.equal(a, b) for a, b in zip(received, tensors, strict=True))


def test_garbage_metadata_and_tensors_raise_typed_errors():
    import pytest
    from hivemind.proto import runtime_pb2

    with pytest.raises(InvalidRequestError):
        transport.unpack(b"\xc1\xff garbage")
    with pytest.raises(InvalidRequestError):
        transport.unpack(transport.msgpack.packb([1, 2]))
    with pytest.raises(InvalidRequestError):
        transport.deserialize(runtime_pb2.Tensor(buffer=b"abc", size=[5, 5], dtype="float32"))


def test_error_responses_carry_the_type():
    import pytest

    from petals_cli.errors import CacheExhaustedError

    response = transport.error_response(CacheExhaustedError("full"))
    with pytest.raises(CacheExhaustedError, match="full"):
        transport.check_response(response)
    assert transport.check_response(transport.response_messages([], StepResponse(position=3))[0]).position == 3


def test_only_uncompressed_tensors_of_plain_dtypes_are_decoded(monkeypatch):
    """A codec named by the sender (blockwise 8-bit would import bitsandbytes and dequantise natively) or an odd
    dtype is refused before any decoder runs."""
    import pytest
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    decoded = []
    with monkeypatch.context() as patched:
        patched.setattr(transport, "deserialize_torch_tensor", decoded.append)
        for codec in ("FLOAT16", "MEANSTD_16BIT", "UNIFORM_8BIT", "QUANTILE_8BIT", "BLOCKWISE_8BIT"):
            proto = runtime_pb2.Tensor(buffer=b"\0" * 64, size=[3, 4], dtype="float32", compression=codec)
            with pytest.raises(InvalidRequestError, match=f"compression {codec} is not used"):
                transport.deserialize(proto)
    assert not decoded  # refused before any decoder ran
    with pytest.raises(InvalidRequestError, match="compression unknown"):
        transport.deserialize(runtime_pb2.Tensor(buffer=b"", size=[0], dtype="float32", compression=77))
    for dtype in ("object", "U8", "V1000000000", "complex64"):
        with pytest.raises(InvalidRequestError, match="dtype"):
            transport.deserialize(runtime_pb2.Tensor(buffer=b"\0" * 16, size=[1], dtype=dtype))
    honest = serialize_torch_tensor(tensor, runtime_pb2.CompressionType.NONE)
    assert torch.equal(transport.deserialize(honest), tensor)
    for sent in (tensor.half(), tensor.bfloat16(), tensor.long(), tensor > 3, tensor.double()):
        assert torch.equal(transport.deserialize(transport.serialize(sent)), sent)


def test_large_tensors_are_decoded_off_the_event_loop():
    """While a large tensor is reassembled and decoded, other coroutines run: the event loop that serves every other
    session is not held. (Decoding on the loop, nothing else runs until it is done: the stream below never waits.)"""
    import asyncio

    large = torch.randn(1, 2 * transport.OFF_LOOP_BYTES // (4 * 64), 64)
    small = torch.randn(1, 3, 64)

    async def decode(tensors):
        ticks, running = 0, True

        async def tick():
            nonlocal ticks
            while running:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        received, _ = await transport.collect_tensors(_as_stream(transport.request_messages(tensors, b"")))
        during = ticks - before
        running = False
        await ticker
        return received, during

    received, ticks_while_decoding = asyncio.run(decode([large, small]))
    assert torch.equal(received[0], large) and torch.equal(received[1], small)
    assert ticks_while_decoding > 0


def _framed(message) -> bytes:
    """A protobuf as the daemon sends it on its persistent connection: unsigned-varint length, then the bytes."""
    body, length, prefix = message.SerializeToString(), message.ByteSize(), b""
    while True:
        low, length = length & 0x7F, length >> 7
        prefix += bytes([low | (0x80 if length else 0)])
        if not length:
            return prefix + body


def test_an_answer_to_a_call_cancelled_at_that_moment_does_not_stop_the_daemon_reader():
    """hivemind's reader of daemon answers, fed the answer of a call whose timeout fires in the same loop iteration:
    it must go on and answer later calls (without the fix, InvalidStateError ends it and every later call hangs)."""
    from hivemind.p2p.p2p_daemon_bindings.control import ControlClient, DaemonConnector
    from hivemind.proto import p2pd_pb2

    def answer(call_id) -> bytes:
        response = p2pd_pb2.CallUnaryResponse(response=b"pong")
        return _framed(p2pd_pb2.PersistentConnectionResponse(callId=call_id.bytes, callUnaryResponse=response))

    async def scenario():
        client = ControlClient(DaemonConnector(), _initialized_with_create=True)
        daemon = asyncio.StreamReader()
        reading = asyncio.create_task(client._read_from_persistent_conn(daemon))
        peer = PeerID(b"\0" * 34)
        call = asyncio.create_task(client.call_unary_handler(peer, "ping", b""))
        await asyncio.sleep(0)
        (call_id,) = client._pending_calls
        daemon.feed_data(answer(call_id))
        call.cancel()  # its timeout, as the answer arrives
        await asyncio.gather(call, return_exceptions=True)
        await asyncio.sleep(0.05)
        later = asyncio.create_task(client.call_unary_handler(peer, "ping", b""))
        await asyncio.sleep(0)
        (call_id,) = client._pending_calls
        daemon.feed_data(answer(call_id))
        try:
            return reading.done(), await asyncio.wait_for(later, 5)
        finally:
            reading.cancel()

    assert asyncio.run(scenario()) == (False, b"pong")
