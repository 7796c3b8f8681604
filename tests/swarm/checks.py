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
