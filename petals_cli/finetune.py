"""Prompt tuning and LoRA through the swarm: data in, trained prompts or a peft adapter out.

The client owns the trainable prompts (``petals_cli.prompts``) or LoRA weights (``petals_cli.lora``, saved as a
standard peft adapter directory) and an optimizer; every step runs the frozen
remote blocks forward and backward through ``RemoteBlocks`` (which fails over like any request). Data comes
through ``datasets``: every text is tokenised, the texts are joined (separated by EOS) and cut into sequences
of ``seq_len`` tokens, so batches never need padding. The order of sequences is a permutation drawn from
``seed`` and the epoch number, so a run resumed from a checkpoint sees exactly the batches the uninterrupted
run would have. A checkpoint directory holds the saved prompts plus ``trainer_state.pt`` (prompts, optimizer
state, step, losses: one file, replaced atomically, so a run killed while saving resumes from a consistent
state). Knows nothing about the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from petals_cli.config import ClientConfig, FinetuneConfig
from petals_cli.errors import ConfigError
from petals_cli.prompts import read_prompts_metadata, save_prompts

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based, counting resumed steps
    total_steps: int
    loss: float
    tokens_per_second: float


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)  # one per step, from step 1 (resumed runs include old ones)
    steps: int = 0
    tokens: int = 0  # trained in this run
    seconds: float = 0.0  # this run's training time
    output: str = ""

    def to_json(self) -> dict:
        return {
            "steps": self.steps,
            "final_loss": self.losses[-1] if self.losses else None,
            "losses": [round(loss, 6) for loss in self.losses],
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds > 0 else None,
            "output": self.output,
        }


# --- data -------------------------------------------------------------------------------------------------------


def load_texts(path: str, text_field: str = "text") -> list[str]:
    """The texts of a JSONL/JSON, CSV or plain-text file, or of a dataset saved with ``save_to_disk``."""
    import datasets

    if not Path(path).exists():
        raise ConfigError(f"--dataset {path}: no such file or directory")
    datasets.disable_progress_bars()
    try:
        with _quiet_datasets_logging():
            data = _load_data(path)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many unrelated types for unreadable files
        raise ConfigError(
            f"--dataset {path}: cannot read it ({_first_cause(exc)})",
            hint="a .jsonl file holds one JSON object per line, a .csv file starts with a header row; other files "
            "are read as plain text",
        ) from None
    if text_field not in data.column_names:
        raise ConfigError(f"--dataset {path} has no field {text_field!r}; its fields: {', '.join(data.column_names)}")
    texts = [text for text in data[text_field] if isinstance(text, str) and text.strip()]
    if not texts:
        raise ConfigError(f"--dataset {path}: no text in field {text_field!r}")
    return texts


def _load_data(path: str):
    import datasets

    source = Path(path)
    if source.is_dir():
        if not any((source / marker).exists() for marker in _SAVED_DATASET_MARKERS):
            raise ConfigError(f"--dataset {path}: a directory must be saved by datasets' save_to_disk")
        data = datasets.load_from_disk(str(source))
        if isinstance(data, datasets.DatasetDict):
            data = data["train"] if "train" in data else next(iter(data.values()))
        return data
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(source.suffix.lower(), "text")
    return datasets.load_dataset(builder, data_files=str(source), split="train")


@contextlib.contextmanager
def _quiet_datasets_logging():
    """datasets logs a parse failure itself (on its own handler and again through the root logger's) before it
    raises; the ConfigError we raise from it is the one line the user should see."""
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _first_cause(exc: BaseException) -> str:
    """The innermost explicitly chained error: datasets wraps the parser's precise message in a vague one."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def tokenize_texts(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """[sequences, seq_len] token ids: the texts joined with EOS and cut into equal pieces (a short tail is
    dropped; data shorter than ``seq_len`` becomes one shorter sequence)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids + separator)
    if len(ids) < 2:
        raise ConfigError("the dataset tokenises to fewer than 2 tokens")
    if seq_len > len(ids):
        logger.warning(
            "--seq-len %d is longer than the whole dataset (%d tokens, all examples joined): every step trains on "
            "that one sequence of %d tokens",
            seq_len,
            len(ids),
            len(ids),
        )
    length = min(seq_len, len(ids))
    count = len(ids) // length
    return torch.tensor(ids[: count * length]).view(count, length)


def steps_per_epoch(num_sequences: int, batch_size: int) -> int:
    return math.ceil(num_sequences / batch_size)


def batch_for_step(sequences: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of 0-based ``step``: a seeded permutation per epoch, so any step can be recomputed."""
    per_epoch = steps_per_epoch(len(sequences), batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return sequences[order[index * batch_size : (index + 1) * batch_size]]


def total_steps(config: FinetuneConfig, num_sequences: int) -> int:
    return config.steps or steps_per_epoch(num_sequences, config.batch_size) * max(config.epochs, 1)


# --- training ---------------------------------------------------------------------------------------------------


def finetune(
    config: FinetuneConfig, client_config: ClientConfig, on_step: Callable[[StepReport], None] | None = None
) -> FinetuneResult:
    """Train prompts as ``config`` says; returns the loss curve. Saves to ``config.output`` (or the ``resume``
    directory); with neither, the prompts live only in this process, and a warning says so before anything loads."""
    if not (config.output or config.resume):
        logger.warning("no --output: the trained prompts will not be saved (pass --output DIR to keep them)")
    from transformers import AutoTokenizer

    from petals_cli.checkpoint import metadata_dir, resolve_model
    from petals_cli.remote_model import AutoDistributedModelForCausalLM

    state = _read_state(config) if config.resume else None
    source = resolve_model(config.model, revision=client_config.revision or None, token=client_config.token or None)
    tokenizer = AutoTokenizer.from_pretrained(metadata_dir(source))
    sequences = tokenize_texts(load_texts(config.dataset, config.text_field), tokenizer, config.seq_len)
    model = AutoDistributedModelForCausalLM.from_pretrained(config.model, config=client_config)
    try:
        return _train(model, config, sequences, state, on_step)
    finally:
        model.close()


def _read_state(config: FinetuneConfig) -> dict:
    state_path = Path(config.resume) / STATE_FILE
    if not state_path.exists():
        raise ConfigError(f"--resume {config.resume}: no {STATE_FILE} (is it a `petals finetune` checkpoint?)")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if config.method == "lora" or "lora" in state:
        if config.method != "lora" or "lora" not in state:
            raise ConfigError(f"--resume {config.resume}: trained with another --method; pass the same options")
        return state
    metadata = read_prompts_metadata(config.resume)
    if (metadata["method"], metadata["pre_seq_len"]) != (config.method, config.pre_seq_len):
        raise ConfigError(
            f"--resume {config.resume} was trained with --method {metadata['method']} "
            f"--pre-seq-len {metadata['pre_seq_len']}; pass the same options"
        )
    return state


def _train(model, config: FinetuneConfig, sequences: torch.Tensor, state: dict | None, on_step) -> FinetuneResult:
    torch.manual_seed(config.seed)  # the prompts' (or LoRA weights') initial values
    if config.method == "lora":
        model.enable_lora(config.lora_r, config.lora_alpha, config.lora_target_modules)
        if state is not None:
            try:
                model.client_lora.load_state_dict(state["lora"])
            except RuntimeError as exc:
                raise ConfigError(f"--resume {config.resume}: another --lora-r or target modules ({exc})") from None
    else:
        model.enable_prompt_tuning(config.method, config.pre_seq_len)
        if state is not None:
            model.prompt_tuning.load_state_dict(state["prompts"])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, weight_decay=0.0)
    result = FinetuneResult(output=config.output or config.resume)
    first_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        first_step, result.losses = int(state["step"]), [float(loss) for loss in state["losses"]]
    last_step = total_steps(config, len(sequences))
    started = time.perf_counter()
    for step in range(first_step, last_step):
        step_started = time.perf_counter()
        batch = batch_for_step(sequences, step, config.batch_size, config.seed)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result.losses.append(loss.item())
        result.tokens += batch.numel()
        if on_step is not None:
            speed = batch.numel() / max(time.perf_counter() - step_started, 1e-9)
            on_step(StepReport(step + 1, last_step, result.losses[-1], speed))
        if result.output and config.save_every and (step + 1) % config.save_every == 0:
            save_checkpoint(model, optimizer, step + 1, result.losses, result.output, config.model)
    result.seconds = time.perf_counter() - started
    result.steps = last_step
    if result.output:
        save_checkpoint(model, optimizer, last_step, result.losses, result.output, config.model)
    return result


def save_checkpoint(model, optimizer, step: int, losses: list[float], directory: str, model_name: str) -> None:
    """The prompts in the saved format (or the LoRA weights as a peft adapter directory), then what resuming
    needs (one file, written last).

    The state file is the checkpoint's commit mark: a run killed while saving leaves either the previous state
    (still consistent: it holds its own copy of the weights) or the new one, never a state without them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"optimizer": optimizer.state_dict(), "step": step, "losses": torch.tensor(losses, dtype=torch.float64)}
    if getattr(model, "client_lora", None) is not None:
        state["lora"] = model.client_lora.state_dict()
        model.client_lora.save_pretrained(directory, base_model=model_name)
    else:
        state["prompts"] = model.prompt_tuning.state_dict()
        save_prompts(model.prompt_tuning, directory, model=model_name)
    torch.save(state, directory / (STATE_FILE + ".tmp"))
    (directory / (STATE_FILE + ".tmp")).replace(directory / STATE_FILE)
