"""Exactness checks shared by the swarm tests: the distributed model against the same model run locally."""

import time

import torch


def assert_input_gradients_match(distributed, local, tokenizer, prompt: str) -> None:
    """Loss and gradients w.r.t. input embeddings after forward + backward equal local autograd."""
    input_ids = tokenizer(
        [prompt, prompt[::-1]], return_tensors="pt", padding=True, truncation=True, max_length=8
    ).input_ids
    embeddings = local.get_input_embeddings()(input_ids).detach()
    gradients, losses = [], []
    for model in (distributed, local):
        leaf = embeddings.clone().requires_grad_(True)
        loss = model(inputs_embeds=leaf, labels=input_ids).loss
        loss.backward()
        gradients.append(leaf.grad)
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert gradients[1].abs().sum() > 0
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-5, rtol=1e-4)


def eventually(predicate, timeout: float = 10.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def local_prompted_logits(local, input_ids, prefix: torch.Tensor, deep: torch.Tensor | None) -> torch.Tensor:
    """Reference prompt tuning on a local transformers Llama: ``prefix`` before the tokens' embeddings, and
    ``deep[i]`` added to the prefix positions before decoder layer i. Logits of the tokens only."""
    embeddings = local.get_input_embeddings()(input_ids)
    hidden = torch.cat([prefix.unsqueeze(0).expand(input_ids.shape[0], -1, -1), embeddings], dim=1)
    handles = []
    if deep is not None:
        for index, layer in enumerate(local.model.layers):

            def add_prompt(module, args, kwargs, prompt=deep[index]):
                states = args[0]
                states = torch.cat([states[:, : prompt.shape[0]] + prompt, states[:, prompt.shape[0] :]], dim=1)
                return (states, *args[1:]), kwargs

            handles.append(layer.register_forward_pre_hook(add_prompt, with_kwargs=True))
    try:
        return local(inputs_embeds=hidden).logits[:, prefix.shape[0] :]
    finally:
        for handle in handles:
            handle.remove()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def local_prompted_greedy(local, input_ids, prefix, deep, new_tokens: int) -> list[int]:
    """Greedy continuation recomputed from scratch at every token (no cache), with prompts as above."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = local_prompted_logits(local, ids, prefix, deep)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids[0].tolist()
