"""The visual tokenizer, BEiT and the latent (EMA-teacher) objective, each trained on real tissue tiles by the
pretraining loop: falling loss, codebook usage, deterministic tokens, what is saved, and how it loads."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from transformers import AutoModel

from histomim import HistoMIMConfig, HistoMIMForPreTraining, HistoMIMModel, HistoMIMTokenizer, HistoMIMTokenizerConfig
from histomim.mim.modeling_tokenizer import CosineCodebook
from histomim.hub import code_files
from histomim.training.arguments import with_demo_defaults
from histomim.training.pretrain import PretrainArguments, load_model_config, pretrain

from conftest import tiny_config
from test_loading import run_without_histomim

CODEBOOK_SIZE = 64  # 145 tiles x 16 patches = 2320 tokens: ~36 per code, so a short run can use most codes


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a new process would."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_args(workdir, objective: str, **overrides) -> PretrainArguments:
    """The demo on the sample slide, shrunk: 64 px tiles at 1 um/px (145 tiles), tiny ViT, 24 steps."""
    settings = dict(
        config=str(workdir / "config"), output_dir=str(workdir / objective), image_size=64, mpp=1.0, batch_size=32,
        max_steps=24, base_lr=0.02, warmup_steps=1, checkpointing_steps=12, reconstruction_steps=0, demo=True,
        objective=objective, tile_dir=str(workdir / "tiles"),
    )  # fmt: skip
    settings.update(overrides)
    return PretrainArguments(**settings)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny config and a tiny random histomim encoder as the tokenizer's teacher (same 16 px patches)."""
    folder = tmp_path_factory.mktemp("mim-family")
    tiny_config().save_pretrained(folder / "config")
    torch.manual_seed(0)
    HistoMIMModel(tiny_config()).save_pretrained(folder / "teacher")
    return folder


@pytest.fixture(scope="module")
def trained_tokenizer(workdir):
    """`histomim pretrain --objective tokenizer --teacher PATH` (VQ-KD) on the sample slide's tiles."""
    result = pretrain(run_args(workdir, "tokenizer", teacher=str(workdir / "teacher"), codebook_size=CODEBOOK_SIZE, codebook_dim=8))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return result


def falls(summary: dict, factor: float = 0.8) -> bool:
    """The mean loss of the last 10 steps is below `factor` times that of the first 10."""
    return summary["last_mean"] < factor * summary["first_mean"]


# -- the visual tokenizer -----------------------------------------------------------------------------


def test_tokenizer_trains_with_falling_loss_and_uses_most_of_its_codebook(trained_tokenizer, workdir):
    summary = trained_tokenizer.summary
    assert falls(summary), summary["losses"]
    codebook = summary["codebook"]  # measured over every (unaugmented) training tile after training
    assert (codebook["codebook_size"], codebook["tiles"], codebook["tokens"]) == (CODEBOOK_SIZE, 145, 145 * 16)
    assert codebook["usage"] > 0.5 and codebook["perplexity"] > 8, codebook
    saved = json.loads((workdir / "tokenizer" / "pretrain_summary.json").read_text())
    assert saved["config"]["objective"] == "tokenizer" and saved["codebook"] == codebook
    card = (workdir / "tokenizer" / "README.md").read_text()
    assert "visual tokenizer (VQ-KD: a 64 x 8 cosine codebook distilling the patch features of `teacher`)" in card
    assert f"{round(100 * codebook['usage'])}% of 64 codes used" in card


def test_tokenizer_gives_the_same_tokens_twice_and_after_reloading(trained_tokenizer, workdir, tissue_tiles):
    tokenizer = trained_tokenizer.model.train()  # get_codebook_indices is deterministic even from training mode
    codebook_before = tokenizer.quantizer.embedding.clone()
    first = tokenizer.get_codebook_indices(tissue_tiles)
    again = tokenizer.get_codebook_indices(tissue_tiles)
    assert first.shape == (32, 16) and first.dtype == torch.long and torch.equal(first, again)
    assert torch.equal(tokenizer.quantizer.embedding, codebook_before) and tokenizer.training
    assert len(first.unique()) > 8  # real tissue maps to many codes, not one

    folder = workdir / "tokenizer"
    assert not any(name.startswith("teacher.") for name in load_file(folder / "model.safetensors"))  # training only
    assert {path.name for path in code_files(folder)} == {  # what a push uploads for trust_remote_code
        "configuration_tokenizer.py", "modeling_tokenizer.py", "configuration_histomim.py", "modeling_histomim.py", "masking.py",
    }  # fmt: skip
    loaded = AutoModel.from_pretrained(folder)
    assert isinstance(loaded, HistoMIMTokenizer) and loaded.teacher is None
    assert torch.equal(loaded.get_codebook_indices(tissue_tiles), first)


def test_tokenizer_loads_with_trust_remote_code_without_histomim(trained_tokenizer, workdir, tissue_tiles, tmp_path):
    folder = workdir / "tokenizer"
    from safetensors.torch import save_file

    save_file({"pixels": tissue_tiles[:4].contiguous(), "codes": trained_tokenizer.model.get_codebook_indices(tissue_tiles[:4])},
              str(tmp_path / "reference.safetensors"))  # fmt: skip
    code = textwrap.dedent(
        f"""
        from safetensors.torch import load_file
        from transformers import AutoModel
        data = load_file({str(tmp_path / "reference.safetensors")!r})
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__name__ == "HistoMIMTokenizer" and "histomim" not in type(model).__module__.split(".")[0]
        assert torch.equal(model.get_codebook_indices(data["pixels"]), data["codes"])
        print("TOKENS OK")
        """
    )
    assert "TOKENS OK" in run_without_histomim(code, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})


def test_codebook_ema_step_follows_the_formula_and_restarts_dead_codes():
    torch.manual_seed(0)
    codebook = CosineCodebook(codebook_size=4, dim=2, ema_decay=0.9, dead_code_threshold=0.5).train()
    codebook.embedding.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    codebook.cluster_size.fill_(1.0)
    codebook.embed_sum.copy_(codebook.embedding)
    codebook.cluster_size[3] = 0.4  # below the threshold: restarted whatever this batch does
    latent = torch.tensor([[[2.0, 0.2], [1.0, -0.1], [0.1, 3.0]]])  # (1, 3, 2): codes 0, 0, 1
    quantized, indices, _ = codebook(latent)
    assert indices.tolist() == [[0, 0, 1]]
    unit = torch.nn.functional.normalize(latent[0], dim=-1)
    expected_sum0 = 0.9 * torch.tensor([1.0, 0.0]) + 0.1 * (unit[0] + unit[1])
    assert torch.allclose(codebook.cluster_size[:3], torch.tensor([0.9 + 0.2, 0.9 + 0.1, 0.9]))
    assert torch.allclose(codebook.embed_sum[0], expected_sum0)
    assert torch.allclose(codebook.embedding[0], torch.nn.functional.normalize(expected_sum0, dim=0))
    # code 3 was dead: it restarts at one of the batch's (normalised) vectors, counted at the threshold
    assert any(torch.allclose(codebook.embedding[3], vector) for vector in unit)
    assert float(codebook.cluster_size[3]) == 0.5
    assert torch.allclose(quantized, unit[None] + (codebook.embedding.new_tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]) - unit).detach()[None])


def test_pixel_tokenizer_loss_falls_on_real_tiles(tissue_tiles):
    """Without a teacher the tokenizer is a VQ-VAE on the patches' pixels, sharing the same codebook."""
    torch.manual_seed(0)
    config = HistoMIMTokenizerConfig(encoder_config=tiny_config(), codebook_size=32, codebook_dim=8, target="pixels")
    tokenizer = HistoMIMTokenizer(config).train()
    tokenizer.prepare_targets()  # pixels: nothing to load
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        output = tokenizer(tissue_tiles)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert output.codebook_usage > 0.25 and output.codebook_indices.shape == (32, 16)


def test_tokenizer_teacher_must_match_its_patch_grid(workdir):
    config = HistoMIMTokenizerConfig(encoder_config=tiny_config(patch_size=8), codebook_size=8, target_dim=64)
    with pytest.raises(ValueError, match="patch_size 16 differs from the tokenizer's 8"):
        HistoMIMTokenizer(config).set_teacher(AutoModel.from_pretrained(workdir / "teacher"))
    with pytest.raises(ValueError, match="target_dim is unset"):
        HistoMIMTokenizer(HistoMIMTokenizerConfig(encoder_config=tiny_config(), codebook_size=8))


# -- BEiT -----------------------------------------------------------------------------------------------


def test_beit_without_a_tokenizer_fails_clearly():
    with pytest.raises(ValueError, match="objective 'beit' predicts the codes of a visual tokenizer: set tokenizer_name_or_path"):
        HistoMIMConfig(objective="beit")
    with pytest.raises(ValueError, match="--tokenizer PATH"):
        load_model_config(PretrainArguments(config="histomim-vit-tiny16", objective="beit"), None)
    with pytest.raises(ValueError, match="--tokenizer is used by --objective beit only, not with --objective latent"):
        with_demo_defaults(PretrainArguments(demo=True, objective="latent", tokenizer="tok/"))
    with pytest.raises(ValueError, match="--teacher is used by --objective tokenizer only"):
        with_demo_defaults(PretrainArguments(demo=True, objective="beit", teacher="encoder/"))
    with pytest.raises(ValueError, match="is not a tokenizer folder"):
        HistoMIMForPreTraining(tiny_config(objective="beit", tokenizer_name_or_path="/nonexistent/tokenizer"))


def test_beit_trains_on_real_tiles_saves_and_its_encoder_loads(trained_tokenizer, workdir, tissue_tiles, tmp_path):
    result = pretrain(run_args(workdir, "beit", tokenizer=str(workdir / "tokenizer")))
    # the first steps' mean already includes the quick drop from chance (ln 64 = 4.16 nats)
    assert result.summary["losses"][0] > 0.9 * math.log(CODEBOOK_SIZE), result.summary["losses"]
    assert falls(result.summary, 0.9) and result.summary["last_mean"] < 0.6 * math.log(CODEBOOK_SIZE), result.summary["losses"]
    config = result.model.config
    assert (config.objective, config.mask_ratio, config.codebook_size) == ("beit", 0.4, CODEBOOK_SIZE)
    folder = workdir / "beit"
    weights = load_file(folder / "model.safetensors")
    assert "beit_head.weight" in weights and not any(name.startswith("tokenizer.") for name in weights)
    assert "BEiT (masked prediction of visual tokens), mask ratio 0.4" in (folder / "README.md").read_text()

    # the encoder alone, without masking, with histomim and with only the saved code
    encoder = AutoModel.from_pretrained(folder).eval()
    assert type(encoder) is HistoMIMModel and encoder.embeddings.mask_token is None
    with torch.no_grad():
        expected = result.model.histomim.eval()(tissue_tiles[:4]).last_hidden_state
        assert torch.equal(encoder(tissue_tiles[:4]).last_hidden_state, expected)
    from safetensors.torch import save_file

    save_file({"pixels": tissue_tiles[:4].contiguous(), "reference": expected.contiguous()}, str(tmp_path / "ref.safetensors"))
    code = textwrap.dedent(
        f"""
        from safetensors.torch import load_file
        from transformers import AutoModel
        data = load_file({str(tmp_path / "ref.safetensors")!r})
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "HistoMIMModel" and "histomim" not in type(model).__module__.split(".")[0]
        with torch.no_grad():
            assert torch.allclose(model(data["pixels"]).last_hidden_state, data["reference"], atol=1e-6)
        print("ENCODER OK")
        """
    )
    assert "ENCODER OK" in run_without_histomim(code, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})


def test_beit_loss_is_cross_entropy_on_masked_patches_only(tissue_tiles):
    torch.manual_seed(0)
    model = HistoMIMForPreTraining(tiny_config(objective="beit", tokenizer_name_or_path="unused", codebook_size=16)).eval()
    labels = torch.randint(16, (4, 16))
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 5:11] = True
    output = model(tissue_tiles[:4], bool_masked_pos=mask, labels=labels)
    assert output.logits.shape == (4, 16, 16)
    expected = torch.nn.functional.cross_entropy(output.logits[mask], labels[mask])
    assert torch.allclose(output.loss, expected)
    changed = labels.clone()
    changed[~mask] = (changed[~mask] + 1) % 16  # visible patches' targets do not count
    assert torch.equal(model(tissue_tiles[:4], bool_masked_pos=mask, labels=changed).loss, output.loss)
    with pytest.raises(ValueError, match="call prepare_targets"):
        model(tissue_tiles[:4])


# -- latent targets (EMA teacher) -----------------------------------------------------------------------


def test_latent_teacher_changes_only_by_the_ema_formula(tissue_tiles):
    torch.manual_seed(0)
    model = HistoMIMForPreTraining(tiny_config(objective="latent", latent_top_k_layers=2))
    model.prepare_targets()
    model.train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    teacher_before = {name: value.clone() for name, value in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    # 1. a gradient step moves the student, never the teacher (which gets no gradient at all)
    model(tissue_tiles[:8]).loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    optimizer.step()
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    student = dict(model.histomim.named_parameters())
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], model.teacher.blocks[0].attn.qkv.weight)

    # 2. the EMA update is exactly teacher = m * teacher + (1 - m) * student, m on the cosine schedule
    momentum = model.teacher_momentum(3, 10)
    assert momentum == pytest.approx(1.0 - 0.004 * (1 + torch.cos(torch.tensor(0.3 * torch.pi)).item()) / 2)
    model.after_optimizer_step(3, 10)
    for name, value in model.teacher.named_parameters():
        assert torch.allclose(value, momentum * teacher_before[name] + (1 - momentum) * student[name], atol=1e-7), name
    assert model.teacher_momentum(0, 10) == pytest.approx(0.996) and model.teacher_momentum(10, 10) == 1.0


def test_latent_targets_are_the_teachers_normalised_top_layers(tissue_tiles):
    torch.manual_seed(0)
    model = HistoMIMForPreTraining(tiny_config(objective="latent", latent_top_k_layers=1, num_hidden_layers=3))
    model.prepare_targets()
    with torch.no_grad():
        last_block = model.teacher(tissue_tiles[:2], output_hidden_states=True).hidden_states[-1][:, 1:]
    target = model.latent_targets(tissue_tiles[:2])  # (2, 16, 64)
    assert torch.allclose(target, torch.nn.functional.layer_norm(last_block, (64,)), atol=1e-6)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)


def test_latent_trains_on_real_tiles_and_keeps_its_teacher_in_checkpoints_only(workdir):
    result = pretrain(run_args(workdir, "latent"))
    assert falls(result.summary), result.summary["losses"]
    folder = workdir / "latent"
    assert result.model.config.mask_ratio == 0.6
    published = load_file(folder / "model.safetensors")
    assert "latent_head.weight" in published and not any(name.startswith("teacher.") for name in published)
    checkpoint = load_file(folder / "checkpoints" / "step_00000024" / "model.safetensors")
    assert any(name.startswith("teacher.") for name in checkpoint)  # for resume
    assert torch.equal(checkpoint["teacher.blocks.0.mlp.fc1.weight"], result.model.teacher.blocks[0].mlp.fc1.weight)
    assert type(AutoModel.from_pretrained(folder)) is HistoMIMModel
