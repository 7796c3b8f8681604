"""Text in, text out: tokenise a prompt, generate through the swarm, stream decoded text to a callback.

Sampling and decoding are transformers' own ``generate()``; this module chooses its arguments (a fresh
``Speculation`` per call when speculative decoding is asked for) and turns token ids into text pieces as they
arrive. Knows nothing about the CLI or the terminal.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from petals_cli.config import ClientConfig
from petals_cli.errors import ConfigError
from petals_cli.speculative import MODES, Speculation, SpeculationStats


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # generation ends at the first of these; the text is cut before it
    seed: int | None = None
    speculative: str = ""  # "" (plain decoding) or a speculative mode: ngram, model (see petals_cli.speculative)
    draft_tokens: int = 8  # the most drafts a trip when speculative

    def __post_init__(self):
        # one check for the flags of generate and chat and for chat's /params
        problems = [
            (self.max_new_tokens < 1, f"max new tokens {self.max_new_tokens}: generate at least 1"),
            (self.temperature < 0, f"temperature {self.temperature}: must be 0 (greedy) or above"),
            (not 0 < self.top_p <= 1, f"top p {self.top_p}: must be above 0 and at most 1"),
            (self.top_k < 0, f"top k {self.top_k}: must be 0 (all tokens) or above"),
            (
                not self.repetition_penalty > 0,
                f"repetition penalty {self.repetition_penalty}: must be above 0 "
                "(1 = none; above 1 discourages repeats)",
            ),
            (
                self.speculative not in ("", *MODES),
                f"speculative {self.speculative!r}: choose one of {', '.join(MODES)} (or none)",
            ),
            (self.draft_tokens < 1, f"draft tokens {self.draft_tokens}: draft at least 1"),
        ]
        for wrong, message in problems:
            if wrong:
                raise ConfigError(message)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token, its log-probability and the ``top`` most likely tokens of that step with theirs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class LogprobRecorder(LogitsProcessor):
    """Records the model's log-probabilities at each step of a one-row generate() call (the distribution the
    model gave, before temperature and top-p; after a repetition penalty, which transformers applies first), and
    the ``top`` most likely tokens. Which token was chosen is learnt from the streamer (``chose``), the next
    step's input, or the final output (``entries``); only the latest step's whole distribution is kept."""

    def __init__(self, top: int = 0):
        self.top = top
        self.settled: list[TokenLogprob] = []
        self.pending: tuple[torch.Tensor, tuple] | None = None  # (log-probabilities, top) of the unsettled step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != 1:
            raise ConfigError("log-probabilities are recorded for one sequence at a time")
        if self.pending is not None:
            self.chose(int(input_ids[0, -1]))
        logprobs = torch.log_softmax(scores[0].float(), dim=-1)
        top = ()
        if self.top:
            values, ids = logprobs.topk(min(self.top, logprobs.shape[0]))
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        self.pending = (logprobs, top)
        return scores

    def chose(self, token_id: int) -> None:
        """The token the latest step produced (a no-op once that step is settled)."""
        if self.pending is not None:
            logprobs, top = self.pending
            self.settled.append(TokenLogprob(token_id, float(logprobs[token_id]), top))
            self.pending = None

    def entries(self, token_ids: list[int]) -> list[TokenLogprob]:
        """The records of ``token_ids``, the new tokens of the call."""
        if len(token_ids) > len(self.settled):
            self.chose(token_ids[len(self.settled)])
        return self.settled[: len(token_ids)]


class SeededSampler(LogitsProcessor):
    """Samples the next token itself, from a generator of its own seeded with ``seed`` (temperature, then top-k,
    then top-p, as transformers orders them) and leaves only that token possible, for greedy selection to take.
    torch's global generator is shared by every thread of a process; this one is not, so a seeded request
    repeats however many others generate beside it."""

    def __init__(self, options: GenerationOptions, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.warpers = [TemperatureLogitsWarper(options.temperature)]
        if options.top_k:
            self.warpers.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(options.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        picked = torch.multinomial(torch.softmax(scores.float(), dim=-1), 1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, picked, 0.0)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int] = field(default_factory=list)  # new tokens only
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    speculation: dict | None = None  # SpeculationStats.to_json() of this call; None when it did not speculate
    logprobs: list[TokenLogprob] | None = None  # one per new token when a LogprobRecorder was given

    def to_json(self) -> dict:
        figures = {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_second": round(self.new_tokens / self.seconds, 3) if self.seconds > 0 else None,
        }
        return figures if self.speculation is None else {**figures, "speculation": self.speculation}


def new_speculation(
    options: GenerationOptions, draft_model=None, stats: SpeculationStats | None = None
) -> Speculation | None:
    """A fresh ``Speculation`` for one generate() call as ``options`` ask (None: plain decoding); ``draft_model``
    from ``petals_cli.speculative.load_draft_model`` for mode model; ``stats`` to add up several calls' figures."""
    if not options.speculative:
        return None
    stats = SpeculationStats() if stats is None else stats
    return Speculation(options.speculative, options.draft_tokens, draft_model, stats=stats)


def open_model(
    model: str,
    config: ClientConfig,
    *,
    prompts: str | None = None,
    on_progress=None,
    connecting=contextlib.nullcontext,
):
    """The distributed model (with saved ``prompts``, if given) and its tokenizer (``on_progress``,
    ``connecting``: see ``from_pretrained``)."""
    from transformers import AutoTokenizer

    from petals_cli.checkpoint import metadata_dir, resolve_model
    from petals_cli.remote_model import AutoDistributedModelForCausalLM

    source = resolve_model(model, revision=config.revision or None, token=config.token or None)
    tokenizer = AutoTokenizer.from_pretrained(metadata_dir(source))
    distributed = AutoDistributedModelForCausalLM.from_pretrained(
        model, config=config, prompts=prompts, on_progress=on_progress, connecting=connecting
    )
    return distributed, tokenizer


class _TextStreamer:
    """Receives token ids from generate() and emits newly decoded text (skipping the prompt)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], recorder: LogprobRecorder | None = None):
        self.tokenizer, self.on_text, self.recorder = tokenizer, on_text, recorder
        self.prompt_seen = False
        self.token_ids: list[int] = []
        self.emitted = ""

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.token_ids.extend(value.reshape(-1).tolist())
        if self.recorder is not None:
            self.recorder.chose(self.token_ids[-1])
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted) :])
        self.emitted = text

    def end(self) -> None:
        pass


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the earliest stop sequence (all of it when none occurs)."""
    positions = [text.find(sequence) for sequence in stop if sequence and sequence in text]
    return text[: min(positions)] if positions else text


class _StoppingTextStreamer(_TextStreamer):
    """Streams text but holds back anything that may be the start of a stop sequence, and never emits one."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop: tuple[str, ...], recorder=None):
        super().__init__(tokenizer, self._collect, recorder)
        self.forward, self.stop, self.text, self.shown, self.stopped = on_text, stop, "", 0, False

    def _collect(self, piece: str) -> None:
        if self.stopped:
            return
        self.text += piece
        safe = cut_at_stop(self.text, self.stop)
        self.stopped = len(safe) < len(self.text)
        if not self.stopped:  # keep back a tail that could still grow into a stop sequence
            hold = max((len(sequence) - 1 for sequence in self.stop), default=0)
            safe = safe[: max(len(safe) - hold, self.shown)]
        if len(safe) > self.shown:
            self.forward(safe[self.shown :])
            self.shown = len(safe)

    def end(self) -> None:
        if not self.stopped and len(self.text) > self.shown:
            self.forward(self.text[self.shown :])
            self.shown = len(self.text)


def generate(
    model,
    tokenizer,
    prompt: str,
    options: GenerationOptions,
    on_text: Callable[[str], None] | None = None,
    *,
    draft_model=None,
    recorder: LogprobRecorder | None = None,
) -> GenerationResult:
    """Generate a continuation of ``prompt``; ``on_text`` receives text pieces as tokens arrive. With
    ``options.speculative``, drafts (from ``draft_model`` for mode model) are checked several a trip. A
    ``recorder`` collects each new token's log-probability (its ``settled`` list grows as ``on_text`` is
    called) and the result's ``logprobs``."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    if recorder is not None and options.speculative:
        raise ConfigError("log-probabilities are not recorded while decoding speculatively")
    kwargs = _generate_kwargs(tokenizer, options, [recorder] if recorder is not None else [])
    speculation = new_speculation(options, draft_model)
    if speculation is not None:  # only then: a plain transformers model takes no such argument
        kwargs["speculation"] = speculation
    streamer = None
    if on_text is not None:
        streamer = _StoppingTextStreamer(tokenizer, on_text, options.stop, recorder)
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs)
    seconds = time.perf_counter() - started
    new_ids = output[0, input_ids.shape[1] :].tolist()
    return GenerationResult(
        text=cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), options.stop),
        token_ids=new_ids,
        prompt_tokens=input_ids.shape[1],
        new_tokens=len(new_ids),
        seconds=seconds,
        speculation=speculation.stats.to_json() if speculation is not None else None,
        logprobs=recorder.entries(new_ids) if recorder is not None else None,
    )


def generate_batch(
    model, tokenizer, prompts: list[str], options: GenerationOptions, *, draft_model=None
) -> list[GenerationResult]:
    """Continue several prompts in one pass: left-padded to one batch, one inference session for all.

    Greedy outputs equal each prompt's output alone; a row that ends early (end of text or a stop sequence)
    is padded by transformers and trimmed here. ``seconds`` is the whole batch's time. Speculative decoding
    continues one prompt at a time, so with ``options.speculative`` each prompt runs alone through ``generate``
    (its own seconds and speculation figures).
    """
    if options.speculative:
        return [generate(model, tokenizer, prompt, options, draft_model=draft_model) for prompt in prompts]
    if not prompts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(prompt).input_ids for prompt in prompts]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    kwargs = _generate_kwargs(tokenizer, options)
    kwargs["pad_token_id"] = pad_id
    started = time.perf_counter()
    output = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    seconds = time.perf_counter() - started
    results = []
    for row, prompt_ids in zip(output[:, width:].tolist(), rows, strict=True):
        new_ids = _trim_finished(row, tokenizer.eos_token_id, pad_id)
        results.append(
            GenerationResult(
                text=cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), options.stop),
                token_ids=new_ids,
                prompt_tokens=len(prompt_ids),
                new_tokens=len(new_ids),
                seconds=seconds,
            )
        )
    return results


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: one per line, or JSON lines (a string, or an object with "prompt" or "text")."""
    from pathlib import Path

    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read prompts from {path}: {exc}") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    as_json = path.endswith((".jsonl", ".json")) or (numbered and numbered[0][1].lstrip()[:1] in '{"')
    if not as_json:
        return [line for _, line in numbered]
    prompts = []
    for number, line in numbered:
        try:
            value = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{number}: not a JSON line") from None
        if isinstance(value, dict):
            value = value.get("prompt", value.get("text"))
        if not isinstance(value, str):
            raise ConfigError(f'{path}:{number}: expected a string or an object with a "prompt" string')
        prompts.append(value)
    return prompts


def _trim_finished(row: list[int], eos_id: int | None, pad_id: int | None) -> list[int]:
    """A batch row's new tokens up to its end of text; the padding generate() adds after a row finished."""
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and pad_id is not None and pad_id != eos_id and row[-1] == pad_id:
        row = row[:-1]
    return row


def _generate_kwargs(tokenizer, options: GenerationOptions, processors: list | None = None) -> dict:
    """generate()'s arguments for ``options``; ``processors``: logits processors that see the model's scores
    before a seeded sampler picks from them. A seeded sampling call samples with a generator of its own, except
    when speculative (transformers' speculative sampling draws from torch's global generator, seeded here)."""
    processors = list(processors or [])
    private_seed = options.seed is not None and options.temperature > 0 and not options.speculative
    if options.seed is not None and not private_seed:
        torch.manual_seed(options.seed)
    kwargs = dict(
        max_new_tokens=options.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=options.repetition_penalty if options.repetition_penalty != 1.0 else None,
    )
    if options.stop:
        kwargs.update(stop_strings=list(options.stop), tokenizer=tokenizer)
    if private_seed:
        processors.append(SeededSampler(options, options.seed))
    if options.temperature > 0 and not private_seed:
        kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if processors:
        kwargs["logits_processor"] = processors
    return kwargs
