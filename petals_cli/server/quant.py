"""Weight quantisation of a span's linear layers through bitsandbytes: int8 (LLM.int8) or 4-bit NF4.

Only the blocks' ``nn.Linear`` weights are quantised; norms, embeddings of positions and everything the
client holds stay in the span's dtype. bitsandbytes quantises on CUDA and, since 0.45, on the CPU too
(slower than float32 there: on a CPU it saves memory, not time).
"""

from __future__ import annotations

from torch import nn

from petals_cli.errors import ConfigError


def check_quant(mode: str) -> None:
    """Fail early, before any loading, when quantisation is asked for and bitsandbytes is missing."""
    if mode != "none":
        _bitsandbytes()


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "--quant needs bitsandbytes, which is not installed",
            hint="pip install 'petals-cli[quantization]'",
        ) from None
    return bitsandbytes


def quantize_linears(module: nn.Module, mode: str, device: str) -> int:
    """Replace every ``nn.Linear`` under ``module`` by its quantised twin on ``device``; returns how many."""
    if mode == "none":
        return 0
    bnb = _bitsandbytes()
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            setattr(parent, name, _quantized(bnb, child, mode, device))
            replaced += 1
    return replaced


def _quantized(bnb, linear: nn.Linear, mode: str, device: str) -> nn.Module:
    weight = linear.weight.detach().to("cpu")
    has_bias = linear.bias is not None
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=weight.dtype, quant_type="nf4"
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if has_bias:
        new.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=False)
    return new.to(device)  # bitsandbytes quantises the weight as it moves


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (quantised ones at their stored size)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
