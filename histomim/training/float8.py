"""Float8 training of the transformer linears with torchao (Hopper/Ada GPUs; emulated on the CPU).

The matmuls of the QKV, projection and MLP linears run in float8 with dynamic per-tensor scales; weights,
gradients and optimizer state stay in full precision, so checkpoints are ordinary `nn.Linear` weights.
The prediction heads (MAE decoder `pred`, SimMIM head) stay in bf16: they produce the pixels the loss
compares and are a small share of the FLOPs.

This trades exactness for speed: the loss is no longer equal to transformers' at bf16 tolerance, so it
is opt-in (`scripts/pretrain.py --float8`, `scripts/benchmark.py --float8`), never the default.
"""

from __future__ import annotations

from torch import nn

# torch._scaled_mm needs both matrix sides to be multiples of 16
FLOAT8_ALIGNMENT = 16
KEPT_IN_HIGH_PRECISION = ("pred", "simmim_head")


def float8_eligible(module: nn.Module, name: str) -> bool:
    """Linears inside the transformer blocks whose shapes float8 matmuls accept."""
    return (
        isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] not in KEPT_IN_HIGH_PRECISION
        and module.in_features % FLOAT8_ALIGNMENT == 0
        and module.out_features % FLOAT8_ALIGNMENT == 0
    )


def convert_to_float8(model: nn.Module) -> int:
    """Swap eligible `nn.Linear`s of `model` for torchao's `Float8Linear`, in place, before `torch.compile`
    (compile fuses the scaling and casting). Returns how many linears were converted."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as error:
        raise ImportError(
            "float8 training needs torchao: pip install 'histomim[float8]' (or pip install torchao)"
        ) from error
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(
            f"--float8 needs a GPU with float8 matmuls (compute capability 8.9+: Ada, Hopper or newer); "
            f"{torch.cuda.get_device_name()} is {major}.{minor}"
        )
    convert_to_float8_training(model, module_filter_fn=float8_eligible)
    converted = sum(type(module).__name__ == "Float8Linear" for module in model.modules())
    if converted == 0:
        raise ValueError("--float8: no linear layer has sides divisible by 16, so nothing would run in float8")
    return converted


__all__ = ["convert_to_float8", "float8_eligible"]
