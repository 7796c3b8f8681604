"""``DistributedModelForCausalLM``: a transformers causal LM whose decoder blocks run in the swarm.

The client holds only the family's local modules (embeddings, final norm, LM head), built from the model's
own transformers class with zero layers, so ``generate()``, streamers, sampling and logits processors are
transformers' own. Hidden states go through ``InferenceSession`` (with a ``RemoteCache`` that tells
``generate()`` how far the servers' caches reach) or through the differentiable ``RemoteBlocks``.
With prompt tuning (``tuning_mode=``), the trainable ``prompt_tuning`` module's prefix is placed before the
tokens (and its deep prompts sent to the servers); outputs are returned for the tokens only.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from transformers import AutoConfig, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from petals_cli import compat, speculative
from petals_cli.checkpoint import load_tensors, locate, metadata_dir, resolve_model, weight_map
from petals_cli.client import SwarmClient
from petals_cli.client.autograd import RemoteBlocks
from petals_cli.client.inference import InferenceSession
from petals_cli.client.verdicts import Verifier
from petals_cli.config import ClientConfig
from petals_cli.errors import ConfigError
from petals_cli.families import Family, family_for, selfcheck
from petals_cli.families.base import get_module, materialize, span_config, text_config
from petals_cli.lora import ClientLora, block_linear_shapes, resolve_targets
from petals_cli.prompts import PromptTuning, load_prompts
from petals_cli.wire import model_prefix_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RemoteCache(DynamicCache):
    """Stands in for the servers' caches inside ``generate()``: only its length is local."""

    def __init__(self, session: InferenceSession, prefix_length: int = 0):
        super().__init__()
        self.session, self.prefix_length = session, prefix_length
        self.whole_prompt = 0  # set by generate(): the length of its prompt, until the first forward

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.session.position - self.prefix_length, 0)  # the prompt prefix is not the caller's

    is_croppable = True  # speculative decoding: drafts that were not accepted are rolled back on the servers

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers 5); a positive value is the length to keep,
        as transformers 4's assisted generation calls it."""
        if tokens_to_remove > 0:
            length = tokens_to_remove + self.prefix_length
        else:
            length = self.session.position + tokens_to_remove
        self.session.rollback(length)

    # It holds no layers here, but stands for attention caches: generate() slices a continued prompt by the
    # length above only for caches that are not all linear (recurrent), and all() of no layers is True.
    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]


class DistributedModelForCausalLM:
    """Mixin placed in front of a transformers ``*ForCausalLM`` class (see ``AutoDistributedModelForCausalLM``)."""

    petals_family: Family
    petals_client: SwarmClient
    petals_prefix: str
    petals_num_blocks: int
    prompt_tuning: PromptTuning | None  # a submodule once set: no class-level default, which would shadow it
    client_lora: ClientLora | None  # LoRA weights this client trains on the remote blocks (a submodule once set)

    def enable_lora(self, rank: int = 8, alpha: float = 16.0, target_modules=("q_proj", "v_proj")) -> ClientLora:
        """Add fresh trainable LoRA weights for every remote block (peft's naming and initialisation): requests
        carry them, servers apply them for that request only and return their gradients."""
        shapes = block_linear_shapes(self.config, self.petals_family)
        targets = resolve_targets(shapes, list(target_modules))
        lora = ClientLora(
            self.petals_num_blocks, shapes, targets, rank, alpha, block_prefix=self.petals_family.block_prefix
        )
        self.client_lora = lora.to(self.get_input_embeddings().weight.device)
        return self.client_lora

    def enable_prompt_tuning(self, method: str, pre_seq_len: int, *, init_std: float | None = None) -> PromptTuning:
        """Add fresh trainable prompts (every other parameter stays frozen); returns them."""
        hidden_size = self.get_input_embeddings().weight.shape[1]
        std = init_std if init_std is not None else getattr(text_config(self.config), "initializer_range", 0.02)
        tuning = PromptTuning(method, pre_seq_len, self.petals_num_blocks, hidden_size, init_std=std)
        return self.set_prompts(tuning)

    def set_prompts(self, tuning: PromptTuning | None) -> PromptTuning | None:
        """Use these prompts (or none) from now on."""
        self.prompt_tuning = None if tuning is None else tuning.to(self.get_input_embeddings().weight.device)
        return self.prompt_tuning

    def load_prompts(self, directory: str) -> PromptTuning:
        """Use prompts saved by `petals finetune` (see ``petals_cli.prompts`` for the format)."""
        hidden_size = self.get_input_embeddings().weight.shape[1]
        tuning, _ = load_prompts(directory, num_blocks=self.petals_num_blocks, hidden_size=hidden_size)
        return self.set_prompts(tuning)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The prompts' and client-owned LoRA's parameters (what an optimizer should update)."""
        prompts = [] if self.prompt_tuning is None else list(self.prompt_tuning.parameters())
        return prompts + ([] if self.client_lora is None else list(self.client_lora.parameters()))

    @property
    def prefix_length(self) -> int:
        return 0 if self.prompt_tuning is None else self.prompt_tuning.pre_seq_len

    @property
    def deep_prompts(self) -> torch.Tensor | None:
        return None if self.prompt_tuning is None else self.prompt_tuning.deep

    def embed(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Word embeddings (as transformers' ``inputs_embeds``) -> the first block's input (e.g. BLOOM's norm)."""
        hidden = inputs_embeds
        for path in self.petals_family.embedding_modules[1:]:
            hidden = get_module(self, path)(hidden)
        return hidden

    def remote_blocks(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after all remote blocks (differentiable, also in the deep ``prompts``; no cache)."""
        lora = self.client_lora
        weights = [] if lora is None else list(lora.weights)
        if not torch.is_grad_enabled():  # servers then keep no graphs for a backward that will not come
            hidden, prompts = hidden.detach(), None if prompts is None else prompts.detach()
            weights = [weight.detach() for weight in weights]
        client, prefix, num_blocks = self.petals_client, self.petals_prefix, self.petals_num_blocks
        return RemoteBlocks.apply(hidden, prompts, client, prefix, num_blocks, lora, *weights)

    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A session whose server-side caches hold up to ``max_length`` tokens; use as a context manager."""
        return InferenceSession(
            self.petals_client,
            self.petals_prefix,
            self.petals_num_blocks,
            max_length=max_length,
            batch_size=batch_size,
            prompts=self.deep_prompts,
            lora=self.client_lora,
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = compat.pop_cache(kwargs)  # generate() names it as the installed transformers does
        if isinstance(cache, RemoteCache) and input_ids is not None:
            whole, cache.whole_prompt = cache.whole_prompt, 0
            held = cache.get_seq_length()
            if whole and 0 < held < input_ids.shape[1] and input_ids.shape[1] >= whole:
                # the whole conversation again (assisted generation's first trip on a continued session): the
                # servers hold its first ``held`` tokens already
                input_ids = input_ids[:, held:]
                if position_ids is not None and position_ids.shape[-1] == held + input_ids.shape[1]:
                    position_ids = position_ids[..., held:]
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        session = cache.session if isinstance(cache, RemoteCache) else None
        prefixed = self.prompt_tuning is not None and (session is None or session.position == 0)
        if prefixed:
            inputs_embeds = self.prompt_tuning.prepend(inputs_embeds)
        hidden = self.embed(inputs_embeds)
        if session is not None:
            mask = attention_mask
            if mask is not None and self.prompt_tuning is not None:  # the prefix is real tokens of every row
                mask = torch.cat([mask.new_ones(mask.shape[0], self.prompt_tuning.pre_seq_len), mask], dim=1)
                position_ids = None  # generate() counted positions without the prefix: the session recounts
            if mask is not None and (session.padded or not bool(mask.all())):
                if mask.shape[-1] != session.position + hidden.shape[1]:
                    raise ConfigError(
                        f"attention_mask covers {mask.shape[-1]} tokens; the session holds "
                        f"{session.position} and this step adds {hidden.shape[1]}"
                    )
                new_mask = mask[:, -hidden.shape[1] :]
                hidden = session.step(hidden, attention_mask=new_mask, position_ids=position_ids)
            else:
                hidden = session.step(hidden)
            hidden = hidden.to(inputs_embeds)
        else:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ConfigError("padding is supported in generation (inference sessions), not in forward passes")
            hidden = self.remote_blocks(hidden, self.deep_prompts)
        if prefixed:
            hidden = hidden[:, self.prompt_tuning.pre_seq_len :]
        hidden = get_module(self, self.petals_family.final_norm)(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = get_module(self, self.petals_family.lm_head)(hidden)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **compat.output_cache_kwargs(cache))

    @torch.no_grad()
    def generate(self, inputs=None, *args, session: InferenceSession | None = None, **kwargs):
        """transformers ``generate()`` with the attention caches kept on the servers.

        Pass ``session=`` to continue an existing session (e.g. across chat turns); otherwise one is opened
        for this call, sized for the prompt plus ``max_new_tokens``. ``speculation=`` (a
        ``petals_cli.speculative.Speculation``) drafts tokens and checks several in one trip through the swarm;
        transformers' own ``prompt_lookup_num_tokens=`` and ``assistant_model=`` work too, with a fixed draft length.
        """
        if compat.find_cache(kwargs) is not None:  # the caller brought a cache of its own
            return super().generate(inputs, *args, **kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            raise ConfigError("generate() needs input_ids")
        speculation = kwargs.pop("speculation", None)
        if speculation is not None:
            if prompt.shape[0] != 1:
                raise ConfigError("speculative decoding continues one prompt at a time, not a batch")
            kwargs.update(speculation.generate_kwargs())
        context = contextlib.nullcontext(session)
        if session is None:
            length = self._session_length(prompt, kwargs) + self.prefix_length
            context = self.inference_session(length, batch_size=prompt.shape[0])
        token = speculative.active.set(speculation)
        try:
            with context as active:
                cache = RemoteCache(active, self.prefix_length)
                if speculation is not None:
                    speculation.cache = cache  # drafts are cut to what the session still has room for
                cache.whole_prompt = prompt.shape[1]  # the first forward may get it all, held tokens included
                return super().generate(inputs, *args, **{compat.CACHE_NAME: cache}, **kwargs)
        finally:
            speculative.active.reset(token)

    def _get_candidate_generator(self, *args, **kwargs):
        """transformers' drafts, their length chosen trip by trip when ``generate(speculation=...)`` asked."""
        drafts = super()._get_candidate_generator(*args, **kwargs)
        speculation = speculative.active.get()
        return drafts if speculation is None else speculation.drafts(drafts)

    def _session_length(self, prompt: torch.Tensor, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            return prompt.shape[1] + kwargs["max_new_tokens"]
        if kwargs.get("max_length") is not None:
            return kwargs["max_length"]
        if config.max_new_tokens is not None:
            return prompt.shape[1] + config.max_new_tokens
        return max(config.max_length or 0, prompt.shape[1] + 1)

    @property
    def petals_verification(self):
        """What this model's checks (``--verify``) found so far: a ``VerificationCounts``."""
        return Verifier.of(self.petals_client).counts

    def close(self) -> None:
        """Stop the client's networking (the model can no longer reach the swarm)."""
        self.petals_client.close()


class AutoDistributedModelForCausalLM:
    """Entry point: ``AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=[...])``."""

    _classes: dict[type, type] = {}

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        initial_peers=(),
        config: ClientConfig | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        token: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 16,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_target_modules=("q_proj", "v_proj"),
        prompts: str | None = None,
        active_adapter: str | None = None,
        on_progress=None,
        connecting=contextlib.nullcontext,
    ):
        """Load the local modules of ``model`` (a directory or hub repo) and connect to the swarm.

        ``tuning_mode="ptune"|"deep_ptune"`` adds ``pre_seq_len`` fresh trainable prompts
        (``model.trainable_parameters()``); ``prompts=DIR`` uses saved ones instead. ``tuning_mode="lora"`` adds
        trainable LoRA weights (``lora_r``, ``lora_alpha``, ``lora_target_modules`` as peft names them) for every
        remote block, sent with each request; ``loss.backward()`` fills their gradients. ``active_adapter=NAME``
        runs the blocks with a LoRA adapter, through servers that announce it only.
        ``on_progress(bytes_read, bytes_total)`` follows the loading of local weights; the swarm connection is
        made inside the ``connecting()`` context (e.g. a spinner).
        """
        compat.warn_if_untested()
        client_config = config or ClientConfig.from_sources(initial_peers=tuple(initial_peers))
        if active_adapter is not None:
            client_config = dataclasses.replace(client_config, active_adapter=active_adapter)
        if tuning_mode is not None and prompts is not None:
            raise ConfigError("pass either tuning_mode= (new prompts) or prompts= (saved ones), not both")
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        instance = cls.load_local_modules(
            model,
            dtype=dtype or DTYPES.get(client_config.dtype, torch.float32),
            device=client_config.device,
            revision=revision or client_config.revision or None,
            token=token or client_config.token or None,
            on_progress=on_progress,
        )
        instance.petals_prefix = client_config.model_prefix or model_prefix_for(model)
        if tuning_mode == "lora":
            instance.enable_lora(lora_r, lora_alpha, lora_target_modules)
        elif tuning_mode is not None:
            instance.enable_prompt_tuning(tuning_mode, pre_seq_len)
        elif prompts is not None:
            instance.load_prompts(prompts)
        with connecting():
            instance.petals_client = SwarmClient(client_config)
        return instance

    @classmethod
    def load_local_modules(
        cls, model: str, *, dtype: torch.dtype, device: str = "cpu", revision=None, token=None, on_progress=None
    ):
        """The distributed model class with only its local modules loaded (not yet connected to a swarm)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        source = resolve_model(model, revision=revision, token=token)
        hf_config = AutoConfig.from_pretrained(metadata_dir(source))
        family = family_for(hf_config)
        local_config = span_config(text_config(hf_config), 0)
        with torch.device("meta"):
            instance = cls._distributed_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)])(local_config)
        instance.config = hf_config
        files = weight_map(source)
        wanted = {locate(name, files, base_prefix=instance.base_model_prefix): name for name in instance.state_dict()}
        wanted = {found: name for found, name in wanted.items() if found in files}  # a tied head may be absent
        tensors = load_tensors(
            source, wanted, rename=wanted.__getitem__, dtype=dtype, files=files, on_progress=on_progress
        )
        _tie_embeddings(instance, tensors, hf_config)
        materialize(instance, tensors, local_config, device, dtype)
        instance.eval()
        instance.petals_family = family
        instance.prompt_tuning = None
        instance.client_lora = None
        instance.petals_num_blocks = text_config(hf_config).num_hidden_layers
        selfcheck.check_local_modules(instance, super(DistributedModelForCausalLM, instance).forward)
        return instance

    @classmethod
    def _distributed_class(cls, hf_class: type) -> type:
        if hf_class not in cls._classes:
            name = f"Distributed{hf_class.__name__}"
            cls._classes[hf_class] = type(name, (DistributedModelForCausalLM, hf_class), {})
        return cls._classes[hf_class]


def _tie_embeddings(instance, tensors: dict, hf_config) -> None:
    """Checkpoints of tied models omit the head; give it the embedding matrix."""
    if not getattr(text_config(hf_config), "tie_word_embeddings", False):
        return
    names = {module: name for name, module in instance.named_modules()}
    input_name = names[instance.get_input_embeddings()] + ".weight"
    output_name = names[instance.get_output_embeddings()] + ".weight"
    if input_name in tensors:
        tensors.setdefault(output_name, tensors[input_name])
