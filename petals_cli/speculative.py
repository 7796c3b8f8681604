"""Speculative decoding through the swarm: several drafted tokens checked in one trip through the chain.

transformers' assisted generation drafts (prompt lookup in the session's own tokens, or a small local model) and
checks (greedy: drafts are kept while they equal the model's own choice; sampling: the standard speculative
sampling rule, or, for prompt lookup, a token sampled from the model at each drafted position), so the tokens are
the model's; the servers' caches follow through ``RemoteCache.crop`` -> ``InferenceSession.rollback``. What a
swarm needs beside is here: the draft length chosen before each trip from the acceptance rate and the measured
cost of a trip (``DraftLength``), and the figures (``SpeculationStats``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time

from petals_cli.errors import ConfigError

MODES = ("ngram", "model")
PROBE_EVERY = 8  # trips without drafting before one short draft checks whether drafts would now hit

# the speculation of the generate() running in this thread (generate() builds the candidate generator deep inside)
active: contextvars.ContextVar[Speculation | None] = contextvars.ContextVar("petals_speculation", default=None)


@dataclasses.dataclass
class SpeculationStats:
    """Trips through the swarm (the first carries the prompt), what was drafted for them and what was kept."""

    trips: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # new tokens of those trips: the accepted drafts and the model's own token of each trip

    def record(self, drafted: int, accepted: int) -> None:
        self.trips += 1
        self.drafted += drafted
        self.accepted += accepted
        self.tokens += accepted + 1

    def to_json(self) -> dict:
        return {
            "trips": self.trips,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None,
            "accepted_per_trip": round(self.accepted / self.trips, 3) if self.trips else None,
            "tokens_per_trip": round(self.tokens / self.trips, 3) if self.trips else None,
        }


class DraftLength:
    """The draft length with the most expected tokens per second, from what the last trips showed.

    With a per-token acceptance ``a``, k drafts yield 1 + a + ... + a^k tokens a trip (the model's own token
    always comes); a trip costs ``t0 + c * (k + 1) + d * k``: the chain's latency, the servers' work per checked
    token and the drafting per token, fitted on recent trips (older ones weigh less). A workload whose drafts miss
    soon gets k = 0, that is plain decoding, with a short probe every ``PROBE_EVERY`` trips.
    """

    def __init__(self, most: int, decay: float = 0.9):
        self.most, self.decay = most, decay
        self.hits, self.misses = 1.0, 1.0  # acceptance 0.5 until trips say otherwise
        self.fit = [0.0] * 5  # decayed sums: weight, n, t, n*n, n*t over (tokens checked, seconds) of trips
        self.draft_seconds, self.draft_tokens = 0.0, 0.0
        self.idle = 0

    def acceptance(self) -> float:
        return self.hits / (self.hits + self.misses)

    def trip_cost(self) -> tuple[float, float]:
        """(t0, c): seconds of a trip checking n tokens ~ t0 + c * n."""
        weight, n, t, nn, nt = self.fit
        if weight == 0:
            return 0.0, 0.0
        spread = weight * nn - n * n
        mean_t = t / weight
        slope = (weight * nt - n * t) / spread if spread > 1e-9 * weight * weight else mean_t / 40
        slope = min(max(slope, 0.0), mean_t)
        return max(mean_t - slope * n / weight, 0.0), slope

    def choose(self) -> int:
        t0, per_token = self.trip_cost()
        if t0 == 0:
            return self.most  # nothing measured yet
        a = min(self.acceptance(), 0.999)
        per_draft = self.draft_seconds / self.draft_tokens if self.draft_tokens else 0.0
        rate = [
            (1 - a ** (k + 1)) / (1 - a) / (t0 + per_token * (k + 1) + per_draft * k) for k in range(self.most + 1)
        ]
        best = max(range(self.most + 1), key=rate.__getitem__)
        self.idle = self.idle + 1 if best == 0 else 0
        if self.idle >= PROBE_EVERY:
            self.idle, best = 0, 1
        return best

    def observe(self, drafted: int, accepted: int, trip_seconds: float, draft_seconds: float) -> None:
        if drafted:
            self.hits = self.decay * self.hits + accepted
            self.misses = self.decay * self.misses + (accepted < drafted)
            self.draft_seconds = self.decay * self.draft_seconds + draft_seconds
            self.draft_tokens = self.decay * self.draft_tokens + drafted
        n = drafted + 1
        sample = (1, n, trip_seconds, n * n, n * trip_seconds)
        self.fit = [self.decay * old + new for old, new in zip(self.fit, sample, strict=True)]


@dataclasses.dataclass
class Speculation:
    """How one generate() speculates: ``mode`` ngram (prompt lookup) or model (``draft_model``, a local causal
    LM with the same tokenizer), at most ``draft_tokens`` drafts a trip, adaptive unless ``adaptive`` is off."""

    mode: str
    draft_tokens: int = 8
    draft_model: object = None
    adaptive: bool = True
    stats: SpeculationStats = dataclasses.field(default_factory=SpeculationStats)
    cache: object = None  # the RemoteCache of the generate() call (set there): how much room its session has left

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"speculative mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.draft_tokens < 1:
            raise ConfigError(f"draft tokens {self.draft_tokens}: draft at least 1")
        if (self.mode == "model") != (self.draft_model is not None):
            raise ConfigError("--speculative model needs --draft-model PATH (and only it takes one)")

    def generate_kwargs(self) -> dict:
        """What transformers' generate() needs to draft this way."""
        if self.mode == "ngram":
            return {"prompt_lookup_num_tokens": self.draft_tokens}
        return {"assistant_model": self.draft_model}

    def drafts(self, inner) -> _Drafts:
        return _Drafts(inner, self)


class _Drafts:
    """transformers' candidate generator ``inner``, told each trip's draft length, and timed."""

    def __init__(self, inner, speculation: Speculation):
        self.inner, self.speculation = inner, speculation
        self.length = DraftLength(speculation.draft_tokens)
        self.first = True  # the first trip also carries the prompt: not a figure of decoding
        self.pending = (0, 0.0, 0.0)  # this trip's drafts, drafting seconds, when they were handed over

    @property
    def requires_model_outputs(self) -> bool:
        return getattr(self.inner, "requires_model_outputs", False)

    @property
    def model_kwargs_overrides(self) -> dict:
        return getattr(self.inner, "model_kwargs_overrides", {})

    def get_candidates(self, input_ids, **kwargs):
        length = (
            self.length.choose() if self.speculation.adaptive and not self.first else self.speculation.draft_tokens
        )
        started = time.perf_counter()
        if length == 0:
            self.pending = (0, 0.0, started)
            return input_ids, None
        for name in ("num_output_tokens", "num_assistant_tokens"):  # prompt lookup's, a draft model's
            if hasattr(self.inner, name):
                setattr(self.inner, name, length)
        with _quiet_drafting():
            candidates, logits = self.inner.get_candidates(input_ids, **kwargs)
        room = self._room(input_ids)  # prompt lookup does not keep its drafts within the session's length
        if candidates.shape[1] - input_ids.shape[1] > room:
            candidates = candidates[:, : input_ids.shape[1] + room]
            logits = None if logits is None else logits[:, :room]
        drafted_at = time.perf_counter()
        self.pending = (candidates.shape[1] - input_ids.shape[1], drafted_at - started, drafted_at)
        return candidates, logits

    def _room(self, input_ids) -> int:
        """Drafts the session can still take after the tokens of ``input_ids`` it does not hold yet."""
        cache = self.speculation.cache
        if cache is None:
            return self.speculation.draft_tokens
        session = cache.session
        unsent = input_ids.shape[1] - cache.get_seq_length()
        return max(session.max_length - session.position - unsent, 0)

    def update_candidate_strategy(self, input_ids, scores, num_matches) -> None:
        drafted, draft_seconds, sent = self.pending
        accepted = int(num_matches)
        self.speculation.stats.record(drafted, accepted)
        if not self.first:  # the first trip's time is mostly the prompt's
            self.length.observe(drafted, accepted, time.perf_counter() - sent, draft_seconds)
        self.first = False
        self.inner.update_candidate_strategy(input_ids, scores, num_matches)


@contextlib.contextmanager
def _quiet_drafting():
    """A draft model's generate() makes transformers warn about how transformers itself calls it: not the user's."""
    names = ("transformers.generation.utils", "transformers.generation.logits_process")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_draft_model(path: str, target):
    """A local causal LM to draft for ``target`` (the distributed model): same vocabulary, same tokenizer."""
    from transformers import AutoModelForCausalLM

    try:
        draft = AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the draft model {path}: {exc}") from exc
    ours, theirs = target.get_input_embeddings().weight.shape[0], draft.get_input_embeddings().weight.shape[0]
    if ours != theirs:
        raise ConfigError(
            f"the draft model's vocabulary has {theirs} tokens, the model's {ours}: use one that shares its tokenizer"
        )
    return draft
