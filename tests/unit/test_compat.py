"""Living with transformers releases: one place for the cache argument, a tested window, start-up self-checks.

The self-checks must pass on every family with the installed transformers, and must catch the class of bug that
transformers 5.24 caused (a cache handed over under a name the other side does not read): the bugs are injected
here by breaking petals' own plumbing, the layers and generate() stay transformers' own.
"""

import dataclasses
import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from petals_cli import compat
from petals_cli.checkpoint import resolve_model
from petals_cli.errors import SelfCheckError
from petals_cli.families import selfcheck
from petals_cli.remote_model import AutoDistributedModelForCausalLM, RemoteCache
from petals_cli.server.blocks import load_span, read_model_config
from petals_cli.testing import SUPPORTED_FAMILIES, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=SUPPORTED_FAMILIES)
def tiny(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, num_layers=4)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("llama"), "llama", num_layers=4)


def span_of(path, start=1, end=4, dtype=torch.float32):
    source = resolve_model(str(path))
    return load_span(source, read_model_config(source), start, end, device="cpu", dtype=dtype)


def test_the_cache_goes_by_the_name_the_installed_transformers_reads():
    from transformers import LlamaConfig, LlamaModel

    name = compat.cache_name_of(LlamaModel.forward)
    assert name in ("cache", "past_key_values")
    assert name == compat.CACHE_NAME  # the library and a current family agree
    model = LlamaModel(LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2))
    assert compat.cache_kwargs(model, "the cache") == {name: "the cache"}
    assert compat.pop_cache({"cache": None, "past_key_values": "old", "other": 1}) == "old"
    assert compat.pop_cache({"other": 1}) is None


@pytest.mark.parametrize(
    "version, outside",
    [("5.16.1", True), ("5.17.0", False), ("5.20.2", False), ("5.24.0", False), ("5.24.3", False), ("5.25.0", True)],
)
def test_the_tested_window_is_from_the_oldest_release_to_the_newest_minor(monkeypatch, version, outside):
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("5.17.0", "5.24.0"))
    assert compat.outside_tested_window(version) is outside


def test_an_untested_transformers_gives_one_warning_line_and_runs(monkeypatch, caplog):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.99.0")
    compat.warn_if_untested.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="petals_cli.compat"):
            assert compat.warn_if_untested() is True
            compat.warn_if_untested()
    finally:
        compat.warn_if_untested.cache_clear()
    assert len(caplog.records) == 1
    assert "5.99.0" in caplog.text and "5.17.0 to 5.24.0" in caplog.text


def test_the_tested_window_matches_pyproject_and_the_constraints_file():
    oldest, newest = compat.TESTED_TRANSFORMERS
    assert f'"transformers>={oldest[:-2]}' in (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r"^transformers==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned is not None and pinned.group(1) == newest


def test_every_family_passes_the_span_self_check(tiny):
    span = span_of(tiny)
    assert selfcheck.check_span(span) < 1e-4
    whole = span_of(tiny, 0, 4)  # a span starting at the first block, split in two sub-spans
    assert selfcheck.check_span(whole) < 1e-4


def test_every_family_passes_the_client_self_check(tiny):
    # load_local_modules runs the check; run it again to see its figure
    model = AutoDistributedModelForCausalLM.load_local_modules(str(tiny), dtype=torch.float32)
    plain = super(type(model).__mro__[1], model).forward  # the transformers class's own forward
    assert selfcheck.check_local_modules(model, plain) < 1e-4


def test_the_span_self_check_catches_a_cache_the_layers_never_see(tiny_llama, monkeypatch):
    span = span_of(tiny_llama)
    # what happened with transformers 5.24, the other way round: the cache goes under a name nobody reads
    monkeypatch.setattr(compat, "cache_kwargs", lambda model, cache: {"kv_cache": cache})
    with pytest.raises(SelfCheckError, match=rf"token by token.*transformers {re.escape(transformers.__version__)}"):
        selfcheck.check_span(span)


def test_the_span_self_check_catches_an_ignored_padding_mask(tiny_llama, monkeypatch):
    span = span_of(tiny_llama)
    forward = type(span).forward

    def without_masks(self, hidden, start, end, cache=None, *, attention_mask=None, position_ids=None, **kwargs):
        return forward(self, hidden, start, end, cache, **kwargs)

    monkeypatch.setattr(type(span), "forward", without_masks)
    with pytest.raises(SelfCheckError, match="padded row"):
        selfcheck.check_span(span)


def test_the_client_self_check_catches_a_cache_its_forward_never_sees(tiny_llama, monkeypatch):
    monkeypatch.setattr(compat, "pop_cache", lambda kwargs: kwargs.pop("kv_cache", None))
    with pytest.raises(SelfCheckError, match="did not pass its cache"):
        AutoDistributedModelForCausalLM.load_local_modules(str(tiny_llama), dtype=torch.float32)


def test_the_client_self_check_catches_a_session_resent_whole(tiny_llama, monkeypatch):
    # generate() slices a continued prompt by the cache's length; a cache that looks empty gets the whole text again
    monkeypatch.setattr(RemoteCache, "get_seq_length", lambda self, layer_idx=0: 0)
    with pytest.raises(SelfCheckError, match=r"steps of \[3, \d+, \d+\] tokens"):
        AutoDistributedModelForCausalLM.load_local_modules(str(tiny_llama), dtype=torch.float32)


def test_the_client_self_check_catches_a_local_module_left_out(tiny_llama, monkeypatch):
    model = AutoDistributedModelForCausalLM.load_local_modules(str(tiny_llama), dtype=torch.float32)
    family = model.petals_family
    model.model.add_module("no_norm", torch.nn.Identity())  # a family that "forgets" the final norm
    monkeypatch.setattr(model, "petals_family", dataclasses.replace(family, final_norm="model.no_norm"))
    plain = super(type(model).__mro__[1], model).forward
    with pytest.raises(SelfCheckError, match="local modules"):
        selfcheck.check_local_modules(model, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_spans_keep_their_buffers_as_transformers_does(tiny, dtype):
    # transformers keeps rotary frequencies in float32 in a half-precision model; cast, they shift every angle
    local = dict(AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype).named_buffers())
    span = span_of(tiny, 0, 4, dtype=dtype)
    prefix = f"{span.base.base_model_prefix}."
    for name, buffer in span.base.named_buffers():
        expected = local.get(prefix + name, local.get(name))
        if expected is not None:
            assert buffer.dtype == expected.dtype, name
            assert torch.equal(buffer, expected), name
    assert selfcheck.check_span(span) <= selfcheck.tolerance_for(dtype)
