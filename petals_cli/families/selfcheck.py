"""Start-up self-check of a span: does petals' plumbing around transformers compute what transformers computes?

petals drives transformers' own layers, but through its own cache, cache argument, sub-span views, layer
re-indexing, attention masks and positions. When a transformers release changes how any of these is passed, the
layers still run, only on the wrong context (transformers 5.24's renamed cache argument did exactly that). So a
server, once its span is loaded, runs a few random hidden states through it two ways and compares:

- plainly: the whole sequence at once, no cache, no mask (the layers as transformers runs them);
- as it serves sessions: a preallocated cache, a prefill then one-token steps, the span split into two sub-spans
  each with its own cache, and a second, left-padded row with its mask and positions.

Both must agree within a tolerance of the dtype. The errors compared are those of what the blocks add to the
hidden states (outputs minus inputs), so a small contribution cannot hide behind a large residual stream.

A client checks its side the same way (``check_local_modules``): its local modules against the transformers
class's own forward, and ``generate()``'s handing of the cache, through a session over zero blocks.
This module knows nothing about the network.
"""

from __future__ import annotations

import torch

from petals_cli import compat
from petals_cli.errors import SelfCheckError

# Relative to the largest contribution of the blocks. Computing a sequence whole or token by token differs by
# rounding only (about 1e-6 in float32); a cache or mask that is not used changes the result at order 1.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}
PROMPT, STEPS, PADDING = 4, 3, 2


def relative_error(output: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    """The largest difference between two outputs, over the largest magnitude in ``scale``."""
    return (output.float() - expected.float()).abs().max().item() / max(scale.float().abs().max().item(), 1e-12)


def tolerance_for(dtype: torch.dtype, quantized: bool = False) -> float:
    return max(TOLERANCE.get(dtype, 0.1), 0.1 if quantized else 0.0)


def fail(what: str) -> None:
    oldest, newest = compat.TESTED_TRANSFORMERS
    raise SelfCheckError(
        f"self-check failed: {what}, under transformers {compat.transformers_version()} "
        f"(tested with {oldest} to {newest})"
    )


@torch.no_grad()
def check_span(span, *, quantized: bool = False, seed: int = 0) -> float:
    """Compare the served computation of ``span`` (a ``SpanRunner``) with the plain one; raise ``SelfCheckError``
    naming the transformers version on a mismatch. Returns the largest relative error seen."""
    start, end = span.start, span.end
    total = PROMPT + STEPS
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, total, span.config.hidden_size, generator=generator).to(span.device)
    tolerance = tolerance_for(span.dtype, quantized)
    worst = 0.0

    plain = span(hidden[:1], start, end)
    cuts = [start, end] if end - start < 2 else [start, (start + end) // 2, end]
    served = hidden[:1]
    for first, last in zip(cuts, cuts[1:], strict=False):
        served = _served(span, served, first, last, "a cached span run token by token", capacity=total)
    contribution = plain - hidden[:1]  # errors are measured against what the blocks add, not the residual stream
    worst = max(worst, _compare(served, plain, contribution, "a cached span run token by token", tolerance))

    # a left-padded row: its real tokens must come out as they do alone
    real = hidden[1:, PADDING:]
    alone = span(real, start, end)
    mask = torch.ones(2, total, dtype=torch.long, device=span.device)
    mask[1, :PADDING] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = torch.cat([hidden[:1], torch.cat([real[:, :1].expand(1, PADDING, -1), real], dim=1)])
    padded = _served(span, batch, start, end, "a padded batch", capacity=total, mask=mask, positions=positions)
    worst = max(worst, _compare(padded[:1], plain, contribution, "a padded batch's full row", tolerance))
    worst = max(worst, _compare(padded[1:, PADDING:], alone, alone - real, "a padded batch's padded row", tolerance))
    return worst


def _served(span, hidden, start: int, end: int, what: str, **kwargs):
    try:
        return _prefill_then_steps(span, hidden, start, end, **kwargs)
    except Exception as exc:  # e.g. a cache indexed other than petals builds it
        fail(f"{what} raised {exc.__class__.__name__}: {exc}")


def _prefill_then_steps(span, hidden, start: int, end: int, *, capacity: int, mask=None, positions=None):
    cache = span.make_cache(start, end, capacity=capacity)
    outputs = []
    for begin, stop in [(0, PROMPT)] + [(step, step + 1) for step in range(PROMPT, hidden.shape[1])]:
        extras = {}
        if mask is not None:
            extras = dict(attention_mask=mask[:, :stop], position_ids=positions[:, begin:stop])
        outputs.append(span(hidden[:, begin:stop], start, end, cache, **extras))
    return torch.cat(outputs, dim=1)


def _compare(output, expected, scale, what: str, tolerance: float) -> float:
    error = relative_error(output, expected, scale)
    if not error <= tolerance:  # NaN fails too
        fail(f"{what} differs from transformers' own computation by {error:.3g} (tolerance {tolerance:.3g})")
    return error


class _PassThroughSession:
    """An inference session over zero blocks: hidden states pass through; it records what each step brought."""

    padded = False

    def __init__(self):
        self.position, self.steps = 0, []

    def step(self, hidden: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
        self.steps.append(hidden.shape[1])
        self.position += hidden.shape[1]
        return hidden


@torch.no_grad()
def check_local_modules(model, plain_forward, *, prompt_length: int = 3, seed: int = 0) -> float:
    """Check a client's ``DistributedModelForCausalLM`` before it joins a swarm; raise ``SelfCheckError`` unless

    - its local modules (embeddings, final norm, head, as the family names them) compute what ``plain_forward``
      (the transformers class's own forward, here with zero layers) computes, and
    - ``generate()`` hands its cache to the model's forward and sends only the tokens the session lacks, both in
      a new session and when a second ``generate()`` continues it with the whole text so far (as chat does).

    Returns the largest relative error of the logits.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    tokens = torch.randint(0, vocab, (1, prompt_length), generator=torch.Generator().manual_seed(seed)).to(device)
    tolerance = tolerance_for(model.dtype)
    session, worst = _PassThroughSession(), 0.0

    def no_remote_blocks(*args, **kwargs):
        fail("generate() did not pass its cache to the model")

    model.remote_blocks = no_remote_blocks  # an instance attribute shadows the method during the check only
    try:
        for new_tokens in (2, 1):
            generated = model.generate(
                tokens,
                session=session,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            for step, logits in enumerate(generated.logits):
                context = generated.sequences[:, : tokens.shape[1] + step]
                expected = plain_forward(input_ids=context, use_cache=False).logits[:, -1]
                what = f"the client's local modules (logits of token {context.shape[1]})"
                worst = max(worst, _compare(logits, expected, expected, what, tolerance))
            tokens = generated.sequences
    finally:
        del model.remote_blocks
    if session.steps != [prompt_length, 1, 1]:
        fail(
            f"generate() sent steps of {session.steps} tokens where a {prompt_length}-token prompt, one more token, "
            f"and a continued session need [{prompt_length}, 1, 1]"
        )
    return worst
