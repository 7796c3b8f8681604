"""Signed evidence that a server computed something else than its replicas: one JSON line per report.

A client that verifies servers (issue 19) re-runs some steps on other replicas; when one server's output
disagrees with the majority it records an ``Evidence``, signs it with this machine's reporter key and appends
it to a local log. ``swarm status`` and ``swarm top`` count the validly signed reports against each server.
The signature covers every field but itself (canonical JSON) and the record carries the reporter's public key,
so anyone can check a report without asking the reporter.

Owns the record, its signature and the log file; knows nothing about the network, sessions or servers
(it never compares outputs itself: the verifier hands it hashes and errors).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from petals_cli.errors import ConfigError
from petals_cli.security import Identity, peer_id_for_public_key

logger = logging.getLogger(__name__)
KINDS = ("inference", "forward", "backward")
LOG_FILE = "verification.jsonl"
REPORTER_KEY_FILE = "reporter.key"
SIGNED_TAG = b"petals-evidence/1\n"  # the signed bytes start with it, so no other petals signature can pass as one


class EvidenceError(ConfigError):
    """A record that is not a well-formed evidence report."""

    hint = "the evidence log holds one JSON object per line, as petals writes them; remove the broken line"


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One server caught disagreeing with the replicas that re-ran the same step."""

    kind: str  # "inference" | "forward" | "backward"
    prefix: str  # the model's DHT prefix
    start: int  # the blocks that were checked: [start, end)
    end: int
    position: int  # token position of the checked inference step, or 0
    inputs_sha256: str  # tensor_sha256 of what every replica was given
    suspect: str  # peer id of the server whose output disagreed
    suspect_sha256: str
    witnesses: tuple[str, ...]  # peer ids of the servers whose outputs agreed
    witness_sha256: str
    max_error: float  # largest difference between the suspect's output and the witnesses'
    tolerance: float  # the difference a correct server may show (dtype, hardware)
    time: float  # Unix seconds
    reporter: str = ""  # peer id of the signing key; set by sign()
    reporter_key: str = ""  # base64 DER SubjectPublicKeyInfo of that key; set by sign()
    signature: str = ""  # base64; "" before signing

    def __post_init__(self):
        # callers may pass a list or ints: normalise, so the signed JSON is the one that reading back yields
        object.__setattr__(self, "witnesses", tuple(self.witnesses))
        for name in ("max_error", "tolerance", "time"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["witnesses"] = list(self.witnesses)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Evidence:
        """Strict about the types of known fields, silent about unknown ones (newer writers may add some)."""
        if not isinstance(data, dict):
            raise EvidenceError(f"evidence: expected an object, got {type(data).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name in data:
                values[field.name] = _checked(field.name, _FIELD_TYPES[field.name], data[field.name])
            elif field.default is dataclasses.MISSING:
                raise EvidenceError(f"evidence: missing field {field.name!r}")
        if values["kind"] not in KINDS:
            raise EvidenceError(f"evidence: kind must be one of {', '.join(KINDS)}, got {values['kind']!r}")
        return cls(**values)


_FIELD_TYPES = {field.name: field.type for field in dataclasses.fields(Evidence)}  # strings: annotations postponed


def _checked(name: str, hint: str, value: Any) -> Any:
    if hint == "tuple[str, ...]":
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise EvidenceError(f"evidence: field {name!r} must be a list of strings")
        return tuple(value)
    expected = {"str": (str,), "int": (int,), "float": (int, float)}[hint]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise EvidenceError(f"evidence: field {name!r} must be {hint}, got {type(value).__name__}")
    return float(value) if hint == "float" else value


def tensor_sha256(tensor) -> str:
    """sha256 (hex) of a tensor's dtype, shape and raw bytes, taken on the CPU from a contiguous copy."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}:{tuple(tensor.shape)}\n".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- signatures ---------------------------------------------------------------------------------------------


def signed_bytes(evidence: Evidence) -> bytes:
    """What the signature covers: every field but ``signature``, as JSON with sorted keys and no spaces."""
    fields = evidence.to_json()
    del fields["signature"]
    return SIGNED_TAG + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign(evidence: Evidence, identity: Identity) -> Evidence:
    """``evidence`` signed by ``identity`` (RSA PKCS#1 v1.5, SHA-256), naming it as the reporter."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    public_der = identity.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = dataclasses.replace(
        evidence, reporter=identity.peer_id, reporter_key=base64.b64encode(public_der).decode(), signature=""
    )
    signature = identity.private_key.sign(signed_bytes(unsigned), padding.PKCS1v15(), hashes.SHA256())
    return dataclasses.replace(unsigned, signature=base64.b64encode(signature).decode())


def verify_signature(evidence: Evidence) -> bool:
    """Whether ``reporter_key`` hashes to ``reporter`` and signed exactly these fields."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    try:
        public_der = base64.b64decode(evidence.reporter_key, validate=True)
        signature = base64.b64decode(evidence.signature, validate=True)
        if not signature or peer_id_for_public_key(public_der) != evidence.reporter:
            return False
        public_key = serialization.load_der_public_key(public_der)
        if not isinstance(public_key, rsa.RSAPublicKey):
            return False
        public_key.verify(signature, signed_bytes(evidence), padding.PKCS1v15(), hashes.SHA256())
    except Exception:  # bad base64, a key that does not parse, or a signature that does not verify
        return False
    return True


# --- the log ------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$PETALS_CACHE_DIR``, else ``~/.cache/petals`` (the convention of the server's throughput cache)."""
    return Path(os.environ.get("PETALS_CACHE_DIR") or Path.home() / ".cache" / "petals")


def default_log_path() -> Path:
    """``$PETALS_EVIDENCE_LOG``, else ``<cache>/verification.jsonl``."""
    configured = os.environ.get("PETALS_EVIDENCE_LOG")
    return Path(configured).expanduser() if configured else cache_dir() / LOG_FILE


def reporter_identity(path: str | os.PathLike | None = None) -> Identity:
    """This machine's reporter key (``<cache>/reporter.key`` unless ``path``), created on first use, so every
    report from this machine names the same reporter."""
    key_path = Path(path) if path else cache_dir() / REPORTER_KEY_FILE
    key_path.parent.mkdir(parents=True, exist_ok=True)
    return Identity.load_or_create(str(key_path))


def append(evidence: Evidence, path: str | os.PathLike | None = None) -> None:
    """Add one line to the log; a new log file is readable by its owner only (it names peers and a key)."""
    log_path = Path(path) if path else default_log_path()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(evidence.to_json(), sort_keys=True) + "\n"
    created = not log_path.exists()
    descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if created:
            os.fchmod(descriptor, 0o600)  # whatever the umask
        os.write(descriptor, line.encode())  # one write: concurrent reporters do not interleave lines
    finally:
        os.close(descriptor)


def read(path: str | os.PathLike | None = None) -> list[tuple[Evidence, bool]]:
    """Every record of the log with whether its signature verifies; no log is no records. Lines that are not
    records (cut short, edited by hand) are skipped with a warning."""
    log_path = Path(path) if path else default_log_path()
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            evidence = Evidence.from_json(json.loads(line))
        except (ValueError, RecursionError, EvidenceError) as error:  # json's errors are ValueErrors
            logger.warning("%s:%d: not an evidence record, skipped (%s)", log_path, number, error)
            continue
        records.append((evidence, verify_signature(evidence)))
    return records


def flagged_by_model(path: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """Model prefix -> peer id -> how many validly signed reports in the log name it as the suspect."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for evidence, valid in read(path):
        if valid:
            counts[evidence.prefix][evidence.suspect] += 1
    return {prefix: dict(peers) for prefix, peers in counts.items()}


def flagged(path: str | os.PathLike | None = None, prefix: str | None = None) -> dict[str, int]:
    """Peer id -> how many validly signed reports in the log name it as the suspect (of model ``prefix`` only,
    when given)."""
    by_model = flagged_by_model(path)
    if prefix is not None:
        return by_model.get(prefix, {})
    return dict(sum((collections.Counter(peers) for peers in by_model.values()), collections.Counter()))
