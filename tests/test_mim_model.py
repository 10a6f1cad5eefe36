"""HistoMIM encoder and objectives: masking invariants, losses, gradients, bad input, learning on real tissue."""

from __future__ import annotations

import pytest
import torch

from histomim import HistoMIMForImageClassification, HistoMIMForPreTraining, HistoMIMModel
from histomim.mim.masking import block_random_mask, random_block_masking, random_masking
from histomim.mim.modeling_histomim import patchify, sincos_2d_position_embedding, unpatchify

from conftest import tiny_config


def test_random_masking_keeps_exact_count_and_is_a_function_of_noise():
    noise = torch.rand(4, 196)
    ids_keep, mask, ids_restore = random_masking(4, 196, 0.75, noise)
    assert ids_keep.shape == (4, 49)  # int(196 * 0.25)
    assert torch.all(mask.sum(dim=1) == 147)
    # the kept indices are exactly the unmasked positions
    for row in range(4):
        assert set(ids_keep[row].tolist()) == set(torch.nonzero(mask[row] == 0).flatten().tolist())
    # ids_restore inverts the shuffle
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(196).expand(4, -1))
    again = random_masking(4, 196, 0.75, noise.clone())
    assert torch.equal(again[1], mask) and torch.equal(again[0], ids_keep)
    other = random_masking(4, 196, 0.75, torch.rand(4, 196))
    assert not torch.equal(other[1], mask)


def test_block_mask_masks_whole_blocks_with_exact_count():
    noise = torch.rand(3, 49)  # 224 px / 32 px blocks = 7 x 7
    mask = block_random_mask(3, 14, 32, 16, 0.6, noise)  # (3, 196)
    assert mask.shape == (3, 196) and mask.dtype == torch.bool
    grid = mask.view(3, 14, 14)
    blocks = grid.view(3, 7, 2, 7, 2)
    # every 2x2 group of ViT patches is all-masked or all-visible
    assert torch.all(blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4)))
    assert torch.all(grid.sum(dim=(1, 2)) == round(49 * 0.6) * 4)
    assert torch.equal(block_random_mask(3, 14, 32, 16, 0.6, noise.clone()), mask)


def test_mae_encoder_sees_only_visible_patches_and_same_noise_same_loss():
    model = HistoMIMForPreTraining(tiny_config()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    noise = torch.rand(2, 16)
    out = model(pixels, noise=noise, output_hidden_states=True)
    assert out.hidden_states[-1].shape == (2, 1 + 4, 64)  # CLS + int(16 * 0.25) visible
    assert torch.all(out.mask.sum(dim=1) == 12)
    assert out.logits.shape == (2, 16, 16 * 16 * 3) and out.reconstruction.shape == pixels.shape
    assert torch.equal(model(pixels, noise=noise).loss, out.loss)


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_loss_only_depends_on_masked_patches(objective):
    """The gradient of the loss w.r.t. the predictions is zero on visible patches and not on masked ones."""
    model = HistoMIMForPreTraining(tiny_config(objective=objective, mask_patch_size=16)).eval()
    pixels = torch.randn(2, 3, 64, 64)
    captured = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    head = model.decoder.pred if objective == "mae" else model.simmim_head
    head.register_forward_hook(keep_logits)
    out = model(pixels, noise=torch.rand(2, 16))
    out.loss.backward()
    grad = captured["logits"].grad
    if objective == "mae":
        grad = grad[:, 1:] if grad.shape[1] == 17 else grad  # drop the CLS position
    per_patch = grad.abs().sum(dim=-1)  # (B, L)
    assert torch.all(per_patch[out.mask == 0] == 0)
    assert torch.all(per_patch[out.mask == 1] > 0)


def test_inference_never_masks_and_pools_as_configured():
    pixels = torch.randn(2, 3, 64, 64)
    for pooling, width in (("cls", 64), ("mean", 64), ("cls+mean", 128)):
        model = HistoMIMModel(tiny_config(pooling=pooling, num_register_tokens=2)).eval()
        out = model(pixels)
        assert out.last_hidden_state.shape == (2, 1 + 2 + 16, 64)
        assert out.pooler_output.shape == (2, width)
    cls_model = HistoMIMModel(tiny_config(pooling="cls")).eval()
    out = cls_model(pixels)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])


def test_encoder_with_explicit_mask_matches_pretraining_path():
    model = HistoMIMForPreTraining(tiny_config()).eval()
    pixels, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    out = model(pixels, noise=noise, output_hidden_states=True)
    encoded = model.histomim(pixels, bool_masked_pos=out.mask.bool())
    assert encoded.last_hidden_state.shape == (2, 5, 64)
    # the same visible tokens, possibly in another order: compare the CLS token
    with torch.no_grad():
        direct = model.histomim(pixels, ids_keep=random_masking(2, 16, 0.75, noise)[0])
    torch.testing.assert_close(encoded.last_hidden_state[:, 0], direct.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_attention_agree():
    torch.manual_seed(0)
    config = tiny_config()
    sdpa = HistoMIMModel(config).eval()
    eager_config = tiny_config()
    eager_config._attn_implementation = "eager"
    eager = HistoMIMModel(eager_config).eval()
    eager.load_state_dict(sdpa.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(sdpa(pixels).last_hidden_state, eager(pixels).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_training_forward_is_one_graph_for_torch_compile(objective):
    """The whole training forward (mask sampling included) traces as one graph with no break: no host
    syncs such as .item() or data-dependent shapes, so torch.compile sees the full step."""
    model = HistoMIMForPreTraining(tiny_config(objective=objective)).train()
    explanation = torch._dynamo.explain(lambda pixels: model(pixels).loss)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_interpolate_pos_encoding_runs_at_another_size():
    model = HistoMIMModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 3, 96, 96))
    out = model(torch.randn(1, 3, 96, 96), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (1, 1 + 36, 64)
    out = model(torch.randn(1, 3, 64, 96), interpolate_pos_encoding=True)  # non-square
    assert out.last_hidden_state.shape == (1, 1 + 24, 64)
    # at the native size, interpolation is the identity
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(pixels).last_hidden_state, model(pixels, interpolate_pos_encoding=True).last_hidden_state)
    # the MAE objective also trains at another size
    mae = HistoMIMForPreTraining(tiny_config())
    loss = mae(torch.randn(2, 3, 96, 96), interpolate_pos_encoding=True).loss
    assert torch.isfinite(loss)


def test_sincos_layout_matches_mae():
    """Column-first [sin_w|cos_w|sin_h|cos_h], the layout of the original MAE weights."""
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    reference = build_2d_sinusoidal_position_embedding(height=14, width=14, embed_dim=768, cls_token=True)
    half = reference.shape[-1] // 2
    reference = torch.cat([reference[..., half:], reference[..., :half]], dim=-1)  # transformers' MAE rotation
    torch.testing.assert_close(sincos_2d_position_embedding(14, 768), reference.float(), atol=1e-6, rtol=1e-5)


def test_patchify_roundtrip():
    pixels = torch.randn(2, 3, 64, 96)
    assert torch.equal(unpatchify(patchify(pixels, 16), 16, (64, 96)), pixels)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = HistoMIMForPreTraining(tiny_config(drop_path_rate=0.0))
    pixels, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)

    def gradients():
        model.zero_grad()
        model(pixels, noise=noise).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    # transformers 5.2x renamed gradient_checkpointing_enable; accept either
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    assert all(block.gradient_checkpointing for block in model.histomim.blocks)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_classification_head_and_loss():
    config = tiny_config(num_labels=3, pooling="cls+mean")
    model = HistoMIMForImageClassification(config)
    out = model(torch.randn(4, 3, 64, 64), labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3) and out.loss.item() > 0
    out.loss.backward()
    assert model.classifier.weight.grad is not None


@pytest.mark.parametrize(
    "settings, argument",
    [
        (dict(mask_ratio=0.0), "mask_ratio"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=1.5), "mask_ratio"),
        (dict(objective="beit-ish"), "objective"),
        (dict(image_size=60), "patch_size"),
        (dict(pooling="max"), "pooling"),
        (dict(hidden_size=66), "hidden_size"),
        (dict(objective="simmim", mask_patch_size=24), "mask_patch_size"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(settings, argument):
    with pytest.raises(ValueError, match=argument):
        tiny_config(**settings)


def test_bad_pixel_values_are_clear_value_errors():
    model = HistoMIMForPreTraining(tiny_config())
    with pytest.raises(ValueError, match="num_channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 70, 70), interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 80, 80))
    with pytest.raises(ValueError, match="noise"):
        model(torch.randn(1, 3, 64, 64), noise=torch.rand(1, 10))


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_training_on_real_tissue_lowers_the_loss(tissue_tiles, objective):
    torch.manual_seed(0)
    model = HistoMIMForPreTraining(tiny_config(objective=objective, mask_patch_size=32 if objective == "simmim" else 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    eval_noise = torch.rand(32, 16 if objective == "mae" else 4, generator=torch.Generator().manual_seed(1))

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(tissue_tiles, noise=eval_noise).loss.item()

    before = eval_loss()
    model.train()
    for step in range(40):
        batch = tissue_tiles[(step * 8) % 32 : (step * 8) % 32 + 8]
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.85 * before, (before, after)


# --------------------------------------------------------------------------- masking as configured (issue 16)


def test_mae_masks_whole_blocks_of_mask_patch_size():
    config = tiny_config(mask_patch_size=32, mask_ratio=0.5)  # 64 px: 2 x 2 blocks of 2 x 2 ViT patches
    model = HistoMIMForPreTraining(config).eval()
    pixels, noise = torch.randn(3, 3, 64, 64), torch.rand(config.mask_noise_shape(3))
    assert noise.shape == (3, 4)
    out = model(pixels, noise=noise, output_hidden_states=True)
    blocks = out.mask.view(3, 2, 2, 2, 2)  # (B, block row, row in block, block col, col in block)
    assert torch.all(blocks.amax(dim=(2, 4)) == blocks.amin(dim=(2, 4)))  # each block all masked or all visible
    assert torch.all(out.mask.sum(dim=1) == 8)
    # the blocks with the largest noise are masked, and the encoder sees exactly the other patches
    assert torch.equal(blocks.amax(dim=(2, 4)).flatten(1), (noise > noise.median(dim=1, keepdim=True).values).float())  # median: the lower middle
    assert out.hidden_states[-1].shape == (3, 1 + 8, 64)
    # ids_restore puts [visible, masked] back in image order, as MAE's unshuffle
    ids_shuffle = torch.argsort(out.ids_restore, dim=1)
    assert torch.equal(torch.gather(out.mask, 1, ids_shuffle)[:, :8], torch.zeros(3, 8))
    assert torch.equal(model(pixels, noise=noise).loss, out.loss)


def test_block_masking_at_patch_size_is_plain_random_masking():
    noise = torch.rand(2, 24)
    for got, want in zip(random_block_masking(2, (4, 6), 1, 0.75, noise), random_masking(2, 24, 0.75, noise)):
        assert torch.equal(got, want)
    ids_keep, mask, _ = random_block_masking(2, (4, 6), 2, 0.5, torch.rand(2, 6))  # a non-square grid of blocks
    assert ids_keep.shape == (2, 12) and torch.all(mask.sum(dim=1) == 12)
    for row in range(2):
        assert set(ids_keep[row].tolist()) == set(torch.nonzero(mask[row] == 0).flatten().tolist())
    with pytest.raises(ValueError, match="mask blocks"):
        random_block_masking(2, (4, 5), 2, 0.5)


@pytest.mark.parametrize(
    "settings, realised",
    [
        (dict(objective="simmim", mask_ratio=0.6), 0.5),  # 2 x 2 blocks of 32 px: round(2.4) = 2 masked
        (dict(objective="mae", mask_ratio=0.6, mask_patch_size=32), 0.75),  # int(4 * 0.4) = 1 block visible
        (dict(objective="mae", mask_ratio=0.75), 0.75),
        (dict(objective="mae", mask_ratio=0.6), 10 / 16),  # int(16 * 0.4) = 6 patches visible
    ],
)
def test_realised_mask_ratio_is_what_the_masks_hide(settings, realised):
    config = tiny_config(**settings)
    assert config.realised_mask_ratio() == pytest.approx(realised)
    model = HistoMIMForPreTraining(config).eval()
    out = model(torch.randn(4, 3, 64, 64))
    assert torch.allclose(out.mask.mean(dim=1), torch.tensor(realised))


def test_reconstruction_title_shows_the_realised_ratio(monkeypatch, tmp_path):
    from accelerate import Accelerator

    from histomim.training import plots, pretrain

    titles = []
    monkeypatch.setattr(plots, "save_reconstruction_grid", lambda *args, **kwargs: titles.append(args[-1]))
    model = HistoMIMForPreTraining(tiny_config(objective="simmim", mask_ratio=0.6))
    pretrain.save_reconstructions(Accelerator(cpu=True), model, torch.randn(2, 3, 64, 64), tmp_path / "r.png", 3, 0)
    assert titles[0].startswith("SIMMIM, mask ratio 0.5, step 3, loss on these masked patches ")


def test_norm_pix_reconstructions_show_the_prediction_without_ground_truth_statistics(monkeypatch, tmp_path, tissue_tiles):
    """A decoder that predicts zeros still "reconstructs" patch means once ground-truth statistics are borrowed:
    the grid must show the raw prediction, say which panels borrow them, and state the loss of those tiles."""
    from accelerate import Accelerator

    from histomim.training import plots, pretrain

    model = HistoMIMForPreTraining(tiny_config(norm_pix_loss=True)).eval()
    torch.nn.init.zeros_(model.decoder.pred.weight)
    torch.nn.init.zeros_(model.decoder.pred.bias)  # the zero-output decoder
    calls = []
    real_grid = plots.save_reconstruction_grid
    monkeypatch.setattr(plots, "save_reconstruction_grid", lambda *a, **k: calls.append((a, k)) or real_grid(*a, **k))
    path = pretrain.save_reconstructions(Accelerator(cpu=True), model, tissue_tiles[:2], tmp_path / "r.png", 1, 0)
    args, kwargs = calls[0]
    prediction = kwargs["normalized_prediction"]
    assert torch.equal(prediction, torch.zeros_like(prediction))  # what the model said: nothing
    assert not torch.equal(args[1], torch.zeros_like(args[1]))  # the borrowed-statistics panel is not nothing
    stated = float(args[-1].rsplit(" ", 1)[1])
    assert stated == pytest.approx(1.0, abs=0.01)  # zero prediction of unit-variance targets: loss ~1
    assert path.is_file()


def test_mask_patch_size_follows_the_objective_unless_set(tmp_path):
    config = tiny_config()  # MAE, 64 px
    assert config.mask_patch_size == 16 and config.mask_noise_shape(2) == (2, 16)
    config.objective = "simmim"  # no stale value from construction
    assert config.mask_patch_size == 32 and config.mask_noise_shape(2) == (2, 4)
    assert config.to_dict()["mask_patch_size"] is None  # saved as "follows the objective"
    config.save_pretrained(tmp_path)
    reloaded = type(config).from_pretrained(tmp_path)
    reloaded.objective = "mae"
    assert reloaded.mask_patch_size == 16
    explicit = tiny_config(objective="simmim", mask_patch_size=16)
    explicit.objective = "mae"
    assert explicit.mask_patch_size == 16 and explicit.to_dict()["mask_patch_size"] == 16
    with pytest.raises(ValueError, match="mask_patch_size"):
        tiny_config(objective="mae", mask_patch_size=24)
