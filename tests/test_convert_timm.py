"""Import of timm-layout ViT checkpoints (UNI, Virchow, H-optimus, DINOv2 layouts) into HistoMIMModel.

timm cannot be installed here (it pulls torchvision and a CUDA torch), so the reference is timm's
`VisionTransformer.forward_features` written out from its published formulas: patch conv, CLS/register
tokens with `pos_embed` added before or after they are prepended (`no_embed_class`), pre-norm blocks
x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)) with GELU, packed or split SwiGLU MLPs, final norm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from histomim.mim.convert_timm import convert_timm_vit_state_dict, from_timm_vit, timm_vit_settings

DIM, HEADS, DEPTH, PATCH, IMAGE, HIDDEN = 32, 4, 2, 8, 32, 48
GRID = IMAGE // PATCH


def timm_state_dict(mlp: str = "gelu", registers: int = 0, layerscale: bool = False, pos_prefix: str = "cls",
                    registers_name: str = "reg_token", extra: tuple[str, ...] = (), seed: int = 0) -> dict:
    """Random weights in timm's names. mlp: gelu | packed (fc1 = [gate; value]) | split (fc1_g, fc1_x) |
    w12 (DINOv2). pos_prefix: which prefix tokens `pos_embed` covers: none | cls | all (CLS + registers)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=generator) * scale + offset

    prefix_rows = {"none": 0, "cls": 1, "all": 1 + registers}[pos_prefix]
    state = {
        "patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05), "patch_embed.proj.bias": rand(DIM),
        "cls_token": rand(1, 1, DIM), "pos_embed": rand(1, prefix_rows + GRID * GRID, DIM),
        "norm.weight": rand(DIM, offset=1.0), "norm.bias": rand(DIM),
    }  # fmt: skip
    if registers:
        state[registers_name] = rand(1, registers, DIM)
    for name in extra:
        state[name] = rand(1, DIM)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": rand(DIM, offset=1.0), b + "norm1.bias": rand(DIM),
            b + "attn.qkv.weight": rand(3 * DIM, DIM), b + "attn.qkv.bias": rand(3 * DIM),
            b + "attn.proj.weight": rand(DIM, DIM), b + "attn.proj.bias": rand(DIM),
            b + "norm2.weight": rand(DIM, offset=1.0), b + "norm2.bias": rand(DIM),
        })  # fmt: skip
        if layerscale:  # far from 1e-5, so a dropped LayerScale would show
            state.update({b + "ls1.gamma": rand(DIM, offset=0.8), b + "ls2.gamma": rand(DIM, offset=0.8)})
        fc1, fc2 = {"w12": ("w12", "w3")}.get(mlp, ("fc1", "fc2"))
        if mlp == "split":
            for name in ("fc1_g", "fc1_x"):
                state.update({f"{b}mlp.{name}.weight": rand(HIDDEN, DIM), f"{b}mlp.{name}.bias": rand(HIDDEN)})
        else:
            width = HIDDEN if mlp == "gelu" else 2 * HIDDEN
            state.update({f"{b}mlp.{fc1}.weight": rand(width, DIM), f"{b}mlp.{fc1}.bias": rand(width)})
        state.update({f"{b}mlp.{fc2}.weight": rand(DIM, HIDDEN), f"{b}mlp.{fc2}.bias": rand(DIM)})
    return state


def timm_reference_forward(state: dict, pixels: torch.Tensor, mlp: str, eps: float = 1e-6) -> torch.Tensor:
    """timm's VisionTransformer.forward_features from its formulas: (B, 3, H, W) -> (B, 1 + R + L, D)."""
    tokens = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=PATCH)
    tokens = tokens.flatten(2).transpose(1, 2)  # (B, L, D)
    batch = tokens.shape[0]
    prefix = [state["cls_token"].expand(batch, -1, -1)]
    registers = state.get("reg_token", state.get("register_tokens"))
    if registers is not None:
        prefix.append(registers.expand(batch, -1, -1))
    pos_embed = state["pos_embed"]
    if pos_embed.shape[1] == tokens.shape[1]:  # no_embed_class: positions for the patches only
        hidden = torch.cat(prefix + [tokens + pos_embed], dim=1)
    elif pos_embed.shape[1] == tokens.shape[1] + 1:  # CLS embedded; registers (DINOv2) appended after
        hidden = torch.cat(prefix[:1] + [tokens], dim=1) + pos_embed
        hidden = torch.cat([hidden[:, :1], *prefix[1:], hidden[:, 1:]], dim=1)
    else:  # every prefix token embedded
        hidden = torch.cat(prefix + [tokens], dim=1) + pos_embed
    length, head_dim = hidden.shape[1], DIM // HEADS
    for i in range(DEPTH):
        s = {name.removeprefix(f"blocks.{i}."): v for name, v in state.items() if name.startswith(f"blocks.{i}.")}
        x = F.layer_norm(hidden, (DIM,), s["norm1.weight"], s["norm1.bias"], eps)
        q, k, v = F.linear(x, s["attn.qkv.weight"], s["attn.qkv.bias"]).reshape(batch, length, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attention = ((q * head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
        x = F.linear((attention @ v).transpose(1, 2).reshape(batch, length, DIM), s["attn.proj.weight"], s["attn.proj.bias"])
        hidden = hidden + s.get("ls1.gamma", 1.0) * x
        x = F.layer_norm(hidden, (DIM,), s["norm2.weight"], s["norm2.bias"], eps)
        if mlp == "gelu":
            x = F.linear(F.gelu(F.linear(x, s["mlp.fc1.weight"], s["mlp.fc1.bias"])), s["mlp.fc2.weight"], s["mlp.fc2.bias"])
        elif mlp == "split":  # timm SwiGLU: act(fc1_g x) * fc1_x x
            gated = F.silu(F.linear(x, s["mlp.fc1_g.weight"], s["mlp.fc1_g.bias"])) * F.linear(x, s["mlp.fc1_x.weight"], s["mlp.fc1_x.bias"])
            x = F.linear(gated, s["mlp.fc2.weight"], s["mlp.fc2.bias"])
        else:  # packed: timm SwiGLUPacked (GluMlp, gate_last=False) and DINOv2's SwiGLUFFN: silu(x1) * x2
            fc1, fc2 = ("w12", "w3") if mlp == "w12" else ("fc1", "fc2")
            x1, x2 = F.linear(x, s[f"mlp.{fc1}.weight"], s[f"mlp.{fc1}.bias"]).chunk(2, dim=-1)
            x = F.linear(F.silu(x1) * x2, s[f"mlp.{fc2}.weight"], s[f"mlp.{fc2}.bias"])
        hidden = hidden + s.get("ls2.gamma", 1.0) * x
    return F.layer_norm(hidden, (DIM,), state["norm.weight"], state["norm.bias"], eps)


VARIANTS = {
    "plain (ViT, UNI without layer-scale)": dict(mlp="gelu"),
    "layer-scale + registers, no_embed_class (timm dinov2 reg4)": dict(mlp="gelu", layerscale=True, registers=2, pos_prefix="none"),
    "layer-scale + registers, all prefix tokens embedded": dict(mlp="gelu", layerscale=True, registers=2, pos_prefix="all"),
    "packed SwiGLU fc1/fc2 + layer-scale (Virchow)": dict(mlp="packed", layerscale=True),
    "split SwiGLU fc1_g/fc1_x + registers (timm SwiGLU, H-optimus style)": dict(mlp="split", layerscale=True, registers=4, pos_prefix="none"),
    "DINOv2 original: w12/w3, register_tokens, mask_token": dict(
        mlp="w12", layerscale=True, registers=4, pos_prefix="cls", registers_name="register_tokens", extra=("mask_token",)),
}  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_encoder_equals_the_timm_reference(variant):
    options = VARIANTS[variant]
    state = timm_state_dict(**options)
    model = from_timm_vit(state, num_attention_heads=HEADS, swiglu=options["mlp"] == "packed")
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (DIM, DEPTH, PATCH, IMAGE)
    assert config.num_register_tokens == options.get("registers", 0)
    assert (config.layerscale_init is not None) == options.get("layerscale", False)
    assert config.mlp_type == ("mlp" if options["mlp"] == "gelu" else "swiglu")
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(pixels).last_hidden_state  # (B, 1 + R + L, D)
        reference = timm_reference_forward(state, pixels, options["mlp"])
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_imported_encoder_saves_and_reloads_with_auto_model(tmp_path):
    from transformers import AutoModel

    state = timm_state_dict(mlp="packed", layerscale=True, registers=2, pos_prefix="none")
    model = from_timm_vit(state, num_attention_heads=HEADS, swiglu=True, pooling="cls+mean")
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.equal(model(pixels).pooler_output, reloaded(pixels).pooler_output)


def test_weights_are_read_from_safetensors_files_and_folders_never_pickles(tmp_path):
    state = timm_state_dict(mlp="gelu", layerscale=True)
    save_file(state, str(tmp_path / "model.safetensors"))
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    expected = timm_reference_forward(state, pixels, "gelu")
    for source in (tmp_path / "model.safetensors", tmp_path):
        with torch.no_grad():
            out = from_timm_vit(source, num_attention_heads=HEADS)(pixels).last_hidden_state
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.save(state, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"weights\.pth: only \.safetensors"):
        from_timm_vit(tmp_path / "weights.pth", num_attention_heads=HEADS)


def test_unknown_and_missing_keys_are_listed():
    state = timm_state_dict(mlp="gelu")
    state["head.weight"], state["fc_norm.weight"] = torch.zeros(10, DIM), torch.ones(DIM)
    with pytest.raises(KeyError, match=r"no place in .*\['fc_norm\.weight', 'head\.weight'\]"):
        from_timm_vit(state, num_attention_heads=HEADS)

    state = timm_state_dict(mlp="gelu")
    del state["blocks.1.norm2.bias"]
    with pytest.raises(KeyError, match=r"lacks 'blocks\.1\.norm2\.bias'"):
        from_timm_vit(state, num_attention_heads=HEADS)


def test_position_embeddings_are_resized_to_another_image_size():
    state = timm_state_dict(mlp="gelu")
    config = from_timm_vit(state, num_attention_heads=HEADS).config
    settings = {**timm_vit_settings(state, HEADS), "image_size": 2 * IMAGE}
    mapped = convert_timm_vit_state_dict(state, type(config)(**settings))
    assert mapped["embeddings.position_embeddings"].shape == (1, 1 + (2 * GRID) ** 2, DIM)
