"""Float8 training with torchao (emulated on the CPU: torch._scaled_mm runs there, slowly).

torchao comes with the `float8` extra, which the README's test command installs; these tests fail
rather than skip without it, so that a broken torchao cannot pass unnoticed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histomim import HistoMIMForPreTraining
from histomim.training.float8 import convert_to_float8

from conftest import tiny_config


def float8_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__name__ == "Float8Linear"}


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_every_block_linear_is_converted_and_the_pixel_heads_are_not(objective):
    model = HistoMIMForPreTraining(tiny_config(objective=objective))
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert convert_to_float8(model) == len(float8_names(model))
    head = "decoder.pred" if objective == "mae" else "simmim_head"
    block_linears = {name for name in linears if ".blocks." in name or ".layers." in name or ".layer." in name}
    assert block_linears and block_linears <= float8_names(model)
    assert float8_names(model) == linears - {head}


def train_steps(model: nn.Module, pixels: torch.Tensor, noise: torch.Tensor, steps: int) -> list[float]:
    """bf16-autocast AdamW steps on one batch with a fixed mask; the losses before each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pixels, noise=noise).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_float8_training_follows_bf16_and_saves_ordinary_weights(tmp_path):
    """Same weights, batch and mask: float8 training tracks bf16 training step by step (within 3%), both
    lower the loss, gradients reach every parameter, and the saved model loads as a plain HistoMIM model
    with exactly the trained weights."""
    torch.manual_seed(0)
    reference = HistoMIMForPreTraining(tiny_config()).train()
    model = HistoMIMForPreTraining(tiny_config()).train()
    model.load_state_dict(reference.state_dict())
    convert_to_float8(model)
    config = model.config
    pixels = torch.randn(8, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(8, config.num_patches, generator=torch.Generator().manual_seed(2))

    reference_losses = train_steps(reference, pixels, noise, steps=8)
    losses = train_steps(model, pixels, noise, steps=8)
    assert losses == pytest.approx(reference_losses, rel=0.03)
    assert losses[-1] < losses[0] and reference_losses[-1] < reference_losses[0]
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    model.save_pretrained(tmp_path)
    loaded = HistoMIMForPreTraining.from_pretrained(tmp_path)
    assert not float8_names(loaded)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_missing_torchao_is_named_with_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(ImportError, match="pip install"):
        convert_to_float8(HistoMIMForPreTraining(tiny_config()))
