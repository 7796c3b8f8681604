"""The evidence log: signed records of tampering servers, read back and counted per model."""

import dataclasses
import json
import logging
import stat

import pytest
import torch

from petals_cli import evidence
from petals_cli.errors import PetalsError
from petals_cli.evidence import Evidence, EvidenceError
from petals_cli.security import Identity


@pytest.fixture(scope="module")
def identities(tmp_path_factory) -> tuple[Identity, Identity]:
    root = tmp_path_factory.mktemp("reporters")
    return evidence.reporter_identity(root / "first.key"), evidence.reporter_identity(root / "nested" / "second.key")


def report(suspect="12D3KooWSuspect", prefix="tiny", **changes) -> Evidence:
    fields = dict(
        kind="inference",
        prefix=prefix,
        start=0,
        end=4,
        position=7,
        inputs_sha256="a" * 64,
        suspect=suspect,
        suspect_sha256="b" * 64,
        witnesses=["12D3KooWWitnessOne", "12D3KooWWitnessTwo"],  # a list on purpose: stored as a tuple
        witness_sha256="c" * 64,
        max_error=0.5,
        tolerance=1e-3,
        time=1_800_000_000,  # an int on purpose: stored as a float, so reading back verifies
    )
    return Evidence(**(fields | changes))


def test_signed_evidence_verifies_and_survives_json(identities):
    first, _ = identities
    signed = evidence.sign(report(), first)
    assert signed.reporter == first.peer_id and signed.signature and signed.reporter_key
    assert evidence.verify_signature(signed)
    again = Evidence.from_json(json.loads(json.dumps(signed.to_json())))
    assert again == signed and again.witnesses == ("12D3KooWWitnessOne", "12D3KooWWitnessTwo")
    assert evidence.verify_signature(again)
    assert not evidence.verify_signature(report())  # never signed


@pytest.mark.parametrize(
    "change",
    [{"suspect": "12D3KooWSomeoneElse"}, {"max_error": 0.25}, {"witnesses": ("12D3KooWWitnessOne",)}, {"end": 3}],
    ids=lambda change: next(iter(change)),
)
def test_a_changed_field_fails_verification(identities, change):
    signed = evidence.sign(report(), identities[0])
    assert not evidence.verify_signature(dataclasses.replace(signed, **change))


def test_a_wrong_reporter_key_fails_verification(identities):
    first, second = identities
    signed, others = evidence.sign(report(), first), evidence.sign(report(), second)
    # another key than the reporter's: its peer id does not match
    assert not evidence.verify_signature(dataclasses.replace(signed, reporter_key=others.reporter_key))
    # another reporter with its own key, but the signature is the first's
    claimed = dataclasses.replace(signed, reporter=others.reporter, reporter_key=others.reporter_key)
    assert not evidence.verify_signature(claimed)
    assert not evidence.verify_signature(dataclasses.replace(signed, reporter_key="not base64!"))


def test_from_json_ignores_unknown_fields_and_refuses_wrong_types():
    document = report().to_json() | {"added_later": 1}
    assert Evidence.from_json(document) == report()
    for bad in ({"start": "0"}, {"start": True}, {"witnesses": "peer"}, {"max_error": "big"}, {"kind": "training"}):
        with pytest.raises(EvidenceError) as raised:
            Evidence.from_json(document | bad)
        assert isinstance(raised.value, PetalsError) and raised.value.hint
    with pytest.raises(EvidenceError, match="missing field 'suspect'"):
        Evidence.from_json({key: value for key, value in document.items() if key != "suspect"})
    with pytest.raises(EvidenceError):
        Evidence.from_json([1, 2])


def test_read_skips_garbled_lines_with_a_warning(identities, tmp_path, caplog):
    log = tmp_path / "log" / "verification.jsonl"
    assert evidence.read(log) == []  # no log yet
    evidence.append(evidence.sign(report(), identities[0]), log)
    with log.open("a") as file:
        file.write('{"kind": "inference", "prefix": \n')  # cut short
        file.write('{"kind": 3}\n\n')
        file.write(json.dumps(report().to_json()) + "\n")  # well-formed, unsigned
    with caplog.at_level(logging.WARNING, logger="petals_cli.evidence"):
        records = evidence.read(log)
    assert [valid for _, valid in records] == [True, False]
    assert len([line for line in caplog.messages if "skipped" in line]) == 2


def test_flagged_counts_only_valid_reports_per_model(identities, tmp_path):
    first, second = identities
    log = tmp_path / "verification.jsonl"
    for item in (
        evidence.sign(report("peer-a"), first),
        evidence.sign(report("peer-a"), second),
        evidence.sign(report("peer-b"), first),
        evidence.sign(report("peer-a", prefix="other"), first),
        dataclasses.replace(evidence.sign(report("peer-c"), first), max_error=9.0),  # tampered with afterwards
        report("peer-d"),  # unsigned
    ):
        evidence.append(item, log)
    assert evidence.flagged(log) == {"peer-a": 3, "peer-b": 1}
    assert evidence.flagged(log, prefix="tiny") == {"peer-a": 2, "peer-b": 1}
    assert evidence.flagged(log, prefix="other") == {"peer-a": 1}
    assert evidence.flagged(tmp_path / "missing.jsonl") == {}


def test_log_is_created_private(identities, tmp_path):
    log = tmp_path / "deep" / "verification.jsonl"
    evidence.append(evidence.sign(report(), identities[0]), log)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    evidence.append(evidence.sign(report(), identities[0]), log)
    assert len(log.read_text().splitlines()) == 2


def test_paths_follow_the_environment(identities, tmp_path, monkeypatch):
    monkeypatch.delenv("PETALS_EVIDENCE_LOG", raising=False)
    monkeypatch.setenv("PETALS_CACHE_DIR", str(tmp_path / "cache"))
    assert evidence.default_log_path() == tmp_path / "cache" / "verification.jsonl"
    monkeypatch.setenv("PETALS_EVIDENCE_LOG", str(tmp_path / "elsewhere.jsonl"))
    assert evidence.default_log_path() == tmp_path / "elsewhere.jsonl"
    evidence.append(evidence.sign(report("peer-a"), identities[0]))
    assert evidence.flagged() == {"peer-a": 1}
    assert not (tmp_path / "cache" / "verification.jsonl").exists()


def test_the_reporter_key_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("PETALS_CACHE_DIR", str(tmp_path / "cache"))
    first = evidence.reporter_identity()
    assert first.path == str(tmp_path / "cache" / "reporter.key")
    assert evidence.reporter_identity().peer_id == first.peer_id


def test_tensor_hash_covers_dtype_shape_and_values():
    values = torch.arange(6, dtype=torch.float32)
    digest = evidence.tensor_sha256(values.reshape(2, 3))
    assert len(digest) == 64 and digest == evidence.tensor_sha256(values.reshape(2, 3).clone())
    strided = values.reshape(2, 3).t().contiguous().t()
    assert not strided.is_contiguous() and evidence.tensor_sha256(strided) == digest
    others = {
        evidence.tensor_sha256(values.reshape(3, 2)),
        evidence.tensor_sha256(values.reshape(2, 3).to(torch.float64)),
        evidence.tensor_sha256(values.reshape(2, 3) + 1),
        evidence.tensor_sha256(values.reshape(2, 3).to(torch.bfloat16)),
    }
    assert digest not in others and len(others) == 4
