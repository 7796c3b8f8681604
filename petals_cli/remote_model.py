"""``DistributedModelForCausalLM``: a transformers causal LM whose decoder blocks run in the swarm.

The client holds only the family's local modules (embeddings, final norm, LM head), built from the model's
own transformers class with zero layers, so ``generate()``, streamers, sampling and logits processors are
transformers' own. Hidden states go through ``InferenceSession`` (with a ``RemoteCache`` that tells
``generate()`` how far the servers' caches reach) or through the differentiable ``RemoteBlocks``.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoConfig, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from petals_cli.checkpoint import load_tensors, locate, metadata_dir, resolve_model, weight_map
from petals_cli.client import SwarmClient
from petals_cli.config import ClientConfig
from petals_cli.errors import ConfigError
from petals_cli.families import Family, family_for
from petals_cli.families.base import get_module, materialize, span_config, text_config
from petals_cli.session import InferenceSession, RemoteBlocks
from petals_cli.wire import model_prefix_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RemoteCache(DynamicCache):
    """Stands in for the servers' caches inside ``generate()``: only its length is local."""

    def __init__(self, session: InferenceSession):
        super().__init__()
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position


class DistributedModelForCausalLM:
    """Mixin placed in front of a transformers ``*ForCausalLM`` class (see ``AutoDistributedModelForCausalLM``)."""

    petals_family: Family
    petals_client: SwarmClient
    petals_prefix: str
    petals_num_blocks: int

    def embed(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Word embeddings (as transformers' ``inputs_embeds``) -> the first block's input (e.g. BLOOM's norm)."""
        hidden = inputs_embeds
        for path in self.petals_family.embedding_modules[1:]:
            hidden = get_module(self, path)(hidden)
        return hidden

    def remote_blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states after all remote blocks (differentiable; no cache)."""
        return RemoteBlocks.apply(hidden, self.petals_client, self.petals_prefix, self.petals_num_blocks)

    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A session whose server-side caches hold up to ``max_length`` tokens; use as a context manager."""
        return InferenceSession(
            self.petals_client,
            self.petals_prefix,
            self.petals_num_blocks,
            max_length=max_length,
            batch_size=batch_size,
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        hidden = self.embed(inputs_embeds)
        if isinstance(past_key_values, RemoteCache):
            session = past_key_values.session
            if attention_mask is not None and (session.padded or not bool(attention_mask.all())):
                if attention_mask.shape[-1] != session.position + hidden.shape[1]:
                    raise ConfigError(
                        f"attention_mask covers {attention_mask.shape[-1]} tokens; the session holds "
                        f"{session.position} and this step adds {hidden.shape[1]}"
                    )
                new_mask = attention_mask[:, -hidden.shape[1] :]
                hidden = session.step(hidden, attention_mask=new_mask, position_ids=position_ids)
            else:
                hidden = session.step(hidden)
            hidden = hidden.to(inputs_embeds.dtype)
        else:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ConfigError("padding is supported in generation (inference sessions), not in forward passes")
            hidden = self.remote_blocks(hidden)
        hidden = get_module(self, self.petals_family.final_norm)(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = get_module(self, self.petals_family.lm_head)(hidden)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    @torch.no_grad()
    def generate(self, inputs=None, *args, session: InferenceSession | None = None, **kwargs):
        """transformers ``generate()`` with the attention caches kept on the servers.

        Pass ``session=`` to continue an existing session (e.g. across chat turns); otherwise one is opened
        for this call, sized for the prompt plus ``max_new_tokens``.
        """
        if kwargs.get("past_key_values") is not None:
            return super().generate(inputs, *args, **kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            raise ConfigError("generate() needs input_ids")
        context = contextlib.nullcontext(session)
        if session is None:
            context = self.inference_session(self._session_length(prompt, kwargs), batch_size=prompt.shape[0])
        with context as active:
            return super().generate(inputs, *args, past_key_values=RemoteCache(active), **kwargs)

    def _session_length(self, prompt: torch.Tensor, kwargs: dict) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            return prompt.shape[1] + kwargs["max_new_tokens"]
        if kwargs.get("max_length") is not None:
            return kwargs["max_length"]
        if config.max_new_tokens is not None:
            return prompt.shape[1] + config.max_new_tokens
        return max(config.max_length or 0, prompt.shape[1] + 1)

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
        on_progress=None,
        connecting=contextlib.nullcontext,
    ):
        """Load the local modules of ``model`` (a directory or hub repo) and connect to the swarm.

        ``on_progress(bytes_read, bytes_total)`` follows the loading of local weights; the swarm connection is
        made inside the ``connecting()`` context (e.g. a spinner).
        """
        client_config = config or ClientConfig.from_sources(initial_peers=tuple(initial_peers))
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
        instance.petals_num_blocks = text_config(hf_config).num_hidden_layers
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
