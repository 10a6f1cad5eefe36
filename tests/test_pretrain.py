"""The pretraining loop on real tissue: the default command end to end, exact resume after a kill
during checkpointing, clear errors for bad resume and data inputs, and the optimizer/schedule helpers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel

from histomim import HistoMIMForPreTraining, HistoMIMModel
from histomim.atomic import UMASK
from histomim.hub import check_model_card
from histomim.training.common import (
    CheckpointError,
    latest_checkpoint,
    warmup_cosine,
    weight_decay_groups,
)
from histomim.training.arguments import parse_pretrain_arguments, trackers, with_demo_defaults
from histomim.training.pretrain import PretrainArguments, load_model_config, pretrain

from conftest import tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "pretrain.py"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator, as a new process would."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-config")
    tiny_config(drop_path_rate=0.1).save_pretrained(folder)  # stochastic depth: random draws that resume must repeat
    return folder


def small_run(tiny_config_dir: Path, output_dir: Path, **overrides) -> PretrainArguments:
    """The demo on the sample slide, shrunk: 64 px tiles at 1 um/px (146 tiles, 4 batches per epoch), 8 steps."""
    settings = dict(
        config=str(tiny_config_dir), output_dir=str(output_dir), image_size=64, mpp=1.0, batch_size=32,
        max_steps=8, base_lr=0.02, warmup_steps=1, checkpointing_steps=3, reconstruction_steps=0,
    )  # fmt: skip
    settings.update(overrides)
    settings.setdefault("demo", not settings.get("data"))
    return PretrainArguments(**settings)


# -- the default command -------------------------------------------------------------------------------


def test_default_command_is_the_demo_and_its_loss_falls(tmp_path):
    """`histomim pretrain` exactly as the README runs it (only the output folder moved): the demo."""
    output_dir = tmp_path / "outputs" / "histomim-tiny-demo"
    result = subprocess.run(["histomim", "pretrain"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("demo: histomim-vit-tiny16 learns")
    summary = json.loads((output_dir / "pretrain_summary.json").read_text())
    assert summary["demo"] and summary["steps"] == 150 and summary["config"]["image_size"] == 112
    assert summary["last_mean"] < 0.8 * summary["first_mean"], summary["losses"]
    assert {"README.md", "model.safetensors", "reconstruction.png", "loss_curve.png"} <= {p.name for p in output_dir.iterdir()}


def test_demo_with_small_settings_trains_on_sample_slide_and_saves_a_loadable_model(tiny_config_dir, tmp_path):
    output_dir = tmp_path / "demo"
    command = [
        sys.executable, str(SCRIPT), "--demo", "--config", str(tiny_config_dir), "--image-size", "64", "--max-steps", "6",
        "--batch-size", "16", "--base-lr", "0.02", "--warmup-steps", "1", "--reconstruction-steps", "3",
        "--checkpointing-steps", "3", "--output-dir", str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss: " in result.stdout and "at step 6" in result.stdout
    assert result.stdout.startswith("demo: "), result.stdout[:300]  # the demo says so on its first line

    # the demo path: tiles of the sample slide at 0.5 um/px, made by tile_slides
    summary = json.loads((output_dir / "pretrain_summary.json").read_text())
    assert summary["data"]["slides"] == ["CMU-1-Small-Region"] and summary["data"]["mpp"] == 0.5
    assert summary["steps"] == 6 and len(summary["losses"]) == 6
    assert summary["last_mean"] < summary["first_mean"], summary["losses"]  # the loss falls on real tissue
    assert (output_dir / "tiles" / "0.5mpp-64px" / "manifest.parquet").is_file()

    names = {p.name for p in output_dir.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_histomim.py",
            "reconstruction.png", "loss_curve.png"} <= names  # fmt: skip
    assert {p.name for p in (output_dir / "reconstructions").iterdir()} == {"step_000003.png", "step_000006.png"}
    with Image.open(output_dir / "reconstruction.png") as grid:
        assert grid.width > 400 and grid.height > 400

    # files are readable like any other the user writes (transformers leaves weights 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in output_dir.iterdir() if p.is_file()} == {oct(0o666 & ~UMASK)}

    # the folder is a model: AutoModel gives the trained encoder, the config records the run
    encoder = AutoModel.from_pretrained(output_dir)
    assert type(encoder) is HistoMIMModel
    assert encoder.config.image_size == 64 and encoder.config.target_mpp == 0.5
    saved = load_file(output_dir / "model.safetensors")
    torch.testing.assert_close(
        encoder.blocks[0].attn.qkv.weight, saved["histomim.blocks.0.attn.qkv.weight"], rtol=0, atol=0
    )
    assert not torch.equal(
        saved["histomim.blocks.0.attn.qkv.weight"],
        HistoMIMForPreTraining(tiny_config()).histomim.blocks[0].attn.qkv.weight,
    )

    card = check_model_card((output_dir / "README.md").read_text())
    assert card.data.pipeline_tag == "image-feature-extraction" and "mae" in card.data.tags
    assert "6 (" in card.text and "Slides: 1" in card.text and "CMU-1-Small-Region" not in card.text


def test_report_to_tensorboard_logs_the_training_metrics_and_reconstructions(tiny_config_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(small_run(tiny_config_dir, tmp_path / "run", max_steps=3, checkpointing_steps=0, report_to="tensorboard",
                       reconstruction_steps=3))  # fmt: skip
    event_files = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))  # the run and its hparams
    tags = [EventAccumulator(str(file)).Reload().Tags() for file in event_files]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/img_per_s"} <= {t for tag in tags for t in tag["scalars"]}
    assert any(name.startswith("train/reconstruction") for tag in tags for name in tag["images"])


def test_report_to_names_unknown_and_missing_trackers():
    with pytest.raises(ValueError, match="'tensorbored' is not a tracker"):
        with_demo_defaults(PretrainArguments(report_to="tensorbored"))
    assert trackers("tensorboard") == ["tensorboard"] and trackers("none") is None and trackers("all") == "all"


# -- the demo is explicit; run files ----------------------------------------------------------------------


def test_training_flags_without_data_are_an_error_not_a_silent_demo():
    with pytest.raises(ValueError, match=r"--data is required with --config, --epochs .*--demo"):
        with_demo_defaults(PretrainArguments(config="histomim-vitl16", epochs=100))
    with pytest.raises(ValueError, match="not both"):
        with_demo_defaults(PretrainArguments(data=["tiles/"], demo=True))
    # no flag at all, or only where outputs go: the demo, with its settings, and recorded as such
    args = with_demo_defaults(PretrainArguments(output_dir="elsewhere"))
    assert args.demo and args.max_steps == 150 and args.image_size == 112
    assert with_demo_defaults(args) == args  # filled once, unchanged after


def test_command_line_without_data_exits_with_usage(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--config", "histomim-vitl16", "--epochs", "100"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "--data is required with --config, --epochs" in result.stderr


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_run_files_hold_the_same_keys_as_the_flags(tmp_path, suffix):
    import yaml

    settings = {"config": "histomim-vitb16", "data": ["tiles/"], "max_steps": 7, "mask_ratio": 0.6, "report_to": "none"}
    run_file = tmp_path / f"run{suffix}"
    run_file.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    args = parse_pretrain_arguments([str(run_file)])
    assert (args.config, args.data, args.max_steps, args.mask_ratio, args.demo) == (
        "histomim-vitb16", ["tiles/"], 7, 0.6, False)  # fmt: skip
    run_file.write_text(json.dumps({**settings, "max_stpes": 3}))
    run_file = run_file.rename(tmp_path / "typo.json")
    with pytest.raises(SystemExit):  # an unknown key is refused, not ignored
        parse_pretrain_arguments([str(run_file)])


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--objective", "--mask-ratio", "--data", "--output-dir", "--epochs", "--max-steps",
                 "--batch-size", "--base-lr", "--grad-accum", "--mixed-precision", "--max-grad-norm",
                 "--checkpointing-steps", "--resume-from-checkpoint", "--report-to", "--compile", "--seed",
                 "--image-size", "--push-to-hub", "--hub-model-id", "--num-workers", "--float8",
                 "--augment-on-device", "--demo", "--public", "--card-list-slides", "--license-name"):  # fmt: skip
        assert flag in result.stdout, flag
    assert "SUPPRESS" not in result.stdout and "None" not in result.stdout


# -- exact resume after a kill during checkpointing ------------------------------------------------------

# Runs the real script, but the second checkpoint save dies half-way: its weights file is cut short
# and the process exits at once, without any cleanup (as on SIGKILL or a node failure).
KILLED_DURING_SAVE = textwrap.dedent(
    """
    import os, sys
    import accelerate, torch

    torch.set_num_threads({threads})  # as in the test process: the thread count changes float summation order

    original_save_state = accelerate.Accelerator.save_state
    saves = []

    def save_state_then_die(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        original_save_state(self, output_dir, **kwargs)
        if len(saves) == {die_at_save}:
            weights = os.path.join(output_dir, "model.safetensors")
            os.truncate(weights, os.path.getsize(weights) // 2)
            os._exit(137)

    accelerate.Accelerator.save_state = save_state_then_die
    sys.path.insert(0, {scripts!r})
    import pretrain
    pretrain.main({argv!r})
    """
)


@pytest.fixture(scope="module")
def uninterrupted(tiny_config_dir, tmp_path_factory):
    """8 steps crossing an epoch boundary, checkpoints at steps 3, 6 and 8."""
    args = small_run(tiny_config_dir, tmp_path_factory.mktemp("uninterrupted"))
    result = pretrain(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return args, result


def test_resume_after_kill_during_checkpoint_matches_uninterrupted_run(uninterrupted, tiny_config_dir, tmp_path):
    reference_args, reference = uninterrupted
    assert reference.summary["epochs"] == 2.0  # 146 tiles, 4 batches of 32 per epoch: resume lands in epoch 1
    output_dir = tmp_path / "killed"
    argv = ["--demo", "--config", str(tiny_config_dir), "--output-dir", str(output_dir), "--image-size", "64", "--mpp", "1.0",
            "--batch-size", "32", "--max-steps", "8", "--base-lr", "0.02", "--warmup-steps", "1",
            "--checkpointing-steps", "3", "--reconstruction-steps", "0"]  # fmt: skip
    code = KILLED_DURING_SAVE.format(
        die_at_save=2, threads=torch.get_num_threads(), scripts=str(SCRIPT.parent), argv=argv
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-3000:]

    # the save of step 6 never completed: latest still names step 3, which loads
    checkpoints = output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"
    assert (checkpoints / ".partial-step_00000006").is_dir() and not (checkpoints / "step_00000006").exists()
    assert latest_checkpoint(checkpoints) == checkpoints / "step_00000003"
    with pytest.raises(CheckpointError, match="incomplete"):
        pretrain(
            replace(
                reference_args,
                output_dir=str(output_dir),
                resume_from_checkpoint=str(checkpoints / ".partial-step_00000006"),
            )
        )
    AcceleratorState._reset_state(reset_partial_state=True)

    resumed = pretrain(replace(reference_args, output_dir=str(output_dir), resume_from_checkpoint="latest"))
    assert len(resumed.losses) == 8
    assert resumed.losses[3] == pytest.approx(reference.losses[3], abs=1e-6)  # the step right after the resume point
    assert resumed.losses == pytest.approx(reference.losses, abs=1e-6)
    assert latest_checkpoint(checkpoints) == checkpoints / "step_00000008"
    assert not (checkpoints / ".partial-step_00000006").exists()  # cleaned up by the next save
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_bad_resume_inputs_raise_errors_naming_the_path(uninterrupted, tiny_config_dir, tmp_path):
    reference_args, _ = uninterrupted
    empty = tmp_path / "fresh"
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint found in {empty / 'checkpoints'}")):
        pretrain(replace(reference_args, output_dir=str(empty), resume_from_checkpoint="latest"))
    AcceleratorState._reset_state(reset_partial_state=True)

    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere"):
        pretrain(replace(reference_args, output_dir=str(empty), resume_from_checkpoint=str(tmp_path / "nowhere")))
    AcceleratorState._reset_state(reset_partial_state=True)

    corrupt = tmp_path / "corrupt" / "step_00000006"
    shutil.copytree(Path(reference_args.output_dir) / "checkpoints" / "step_00000006", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=re.escape(f"cannot load checkpoint {corrupt}")):
        pretrain(replace(reference_args, output_dir=str(empty), resume_from_checkpoint=str(corrupt)))


# -- bad data and other objectives ---------------------------------------------------------------------


def test_unreadable_slide_is_named_and_training_goes_on_with_the_others(sample_slide_path, tiny_config_dir, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(sample_slide_path, slides / "CMU-1-Small-Region.svs")
    (slides / "broken.svs").write_bytes(b"II*\x00 this is not a slide")
    result = pretrain(
        small_run(tiny_config_dir, tmp_path / "run", data=[str(slides)], max_steps=2, checkpointing_steps=0)
    )
    assert result.summary["data"]["slides"] == ["CMU-1-Small-Region"]
    [failure] = result.summary["data"]["failed_slides"]
    assert str(slides / "broken.svs") in failure
    assert len(result.losses) == 2
    AcceleratorState._reset_state(reset_partial_state=True)

    (slides / "CMU-1-Small-Region.svs").unlink()
    with pytest.raises(ValueError, match="broken.svs"):
        pretrain(small_run(tiny_config_dir, tmp_path / "run2", data=[str(slides)], max_steps=2))
    AcceleratorState._reset_state(reset_partial_state=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        pretrain(small_run(tiny_config_dir, tmp_path / "run3", data=[str(empty)], max_steps=2))


def test_tiles_from_an_earlier_tiling_are_used_as_they_are(uninterrupted, tiny_config_dir, tmp_path):
    reference_args, _ = uninterrupted
    tile_dir = Path(reference_args.output_dir) / "tiles" / "1mpp-64px"
    result = pretrain(small_run(tiny_config_dir, tmp_path / "run", data=[str(tile_dir)], mpp=0.5, max_steps=2))
    data = result.summary["data"]
    assert (data["source"], data["num_tiles"], data["slides"]) == (str(tile_dir), 146, ["CMU-1-Small-Region"])
    assert data["mpp"] == 1.0 and result.model.config.target_mpp == 1.0  # what the tiles are, not --mpp
    assert not (tmp_path / "run" / "tiles").exists()


def test_simmim_with_gradient_accumulation_trains(tiny_config_dir, tmp_path):
    args = small_run(tiny_config_dir, tmp_path / "simmim", objective="simmim", mask_ratio=0.5, batch_size=16,
                     grad_accum=2, max_steps=3, checkpointing_steps=0)  # fmt: skip
    result = pretrain(args)
    assert result.model.config.objective == "simmim" and result.model.config.mask_patch_size == 32
    assert len(result.losses) == 3 and all(0 < loss < 10 for loss in result.losses)
    assert result.summary["global_batch_size"] == 32
    assert (tmp_path / "simmim" / "reconstruction.png").is_file()


# -- building blocks -----------------------------------------------------------------------------------


def test_augment_on_device_on_saved_tiles_trains_and_is_reproducible(sample_slide_path, tiny_config_dir, tmp_path):
    """Tiles saved by tile_slides, the augmentation moved from the workers to the (here CPU) device:
    training runs, the same seed gives the same losses (so resume stays exact), and the batches
    differ from the CPU pipeline's."""
    from histomim.data.tiling import tile_slides

    tile_slides([sample_slide_path], tmp_path / "tiles", mpp=1.0, tile_size=64, save_images=True)
    saved = str(tmp_path / "tiles" / "tiles")
    runs = [pretrain(small_run(tiny_config_dir, tmp_path / name, data=[saved], max_steps=3, checkpointing_steps=0,
                               augment_on_device=on_device, tile_mpp=tile_mpp))
            for name, on_device, tile_mpp in (("a", True, None), ("b", True, None), ("c", False, 1.0))]  # fmt: skip
    on_device_a, on_device_b, on_workers = (run.losses for run in runs)
    assert runs[0].summary["data"]["num_tiles"] == 145  # 146 before marker ink (teal margin dye) left the tissue mask
    # saved tiles carry no resolution: unknown unless --tile-mpp says it, never the preset's 0.5
    assert runs[0].model.config.target_mpp is None and runs[2].model.config.target_mpp == 1.0
    assert "unknown resolution" in (tmp_path / "a" / "README.md").read_text()
    assert "1 um/px" in (tmp_path / "c" / "README.md").read_text()
    assert all(math.isfinite(loss) for loss in on_device_a)
    assert on_device_a == on_device_b
    assert on_device_a != on_workers


def test_float8_pretraining_saves_an_ordinary_model(tiny_config_dir, tmp_path):
    """--float8 (torchao, emulated on the CPU) trains with float8 linears and saves plain weights."""
    from transformers import AutoModel

    result = pretrain(small_run(tiny_config_dir, tmp_path / "fp8", max_steps=3, checkpointing_steps=0, float8=True))
    assert any(type(module).__name__ == "Float8Linear" for module in result.model.modules())
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    encoder = AutoModel.from_pretrained(tmp_path / "fp8")
    assert not any(type(module).__name__ == "Float8Linear" for module in encoder.modules())
    trained = result.model.histomim.blocks[0].attn.qkv.weight
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, trained.detach().cpu())
    assert "float8 matmuls" in (tmp_path / "fp8" / "README.md").read_text()  # the card says how it was trained


def test_load_model_config_applies_overrides_and_rejects_unknown_configs(tmp_path):
    args = PretrainArguments(config="histomim-vit-tiny16", objective="simmim", mask_ratio=0.6, image_size=128)
    config = load_model_config(args, tile_mpp=0.25)
    assert (config.hidden_size, config.objective, config.mask_ratio, config.image_size) == (192, "simmim", 0.6, 128)
    assert config.mask_patch_size == 32 and config.target_mpp == 0.25 and config.magnification == 40.0
    assert config.mask_noise_shape(4) == (4, 16)  # 4 x 4 blocks of 32 px
    assert load_model_config(PretrainArguments(image_size=112), None).mask_noise_shape(2) == (2, 49)
    with pytest.raises(FileNotFoundError, match="histomim-vit-tiny16"):
        load_model_config(PretrainArguments(config=str(tmp_path / "missing-config")), None)
    with pytest.raises(ValueError, match="mask_ratio"):
        load_model_config(PretrainArguments(mask_ratio=1.5), None)


def test_weight_decay_skips_norms_biases_tokens_and_position_embeddings():
    model = HistoMIMForPreTraining(tiny_config(objective="simmim", num_register_tokens=2))
    decay, no_decay = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert "histomim.blocks.0.attn.qkv.weight" in decayed and "histomim.embeddings.patch_embed.weight" in decayed
    for name in ("histomim.blocks.0.attn.qkv.bias", "histomim.norm.weight", "histomim.embeddings.cls_token",
                 "histomim.embeddings.mask_token", "histomim.embeddings.register_tokens"):  # fmt: skip
        assert name in not_decayed, name
    # fixed sin-cos position embeddings are not trained at all
    assert "histomim.embeddings.position_embeddings" not in decayed | not_decayed
    assert len(decayed) + len(not_decayed) == sum(p.requires_grad for p in model.parameters())


def test_warmup_cosine_schedule():
    multipliers = [warmup_cosine(step, warmup_steps=4, total_steps=20) for step in range(21)]
    assert multipliers[:4] == [0.25, 0.5, 0.75, 1.0]
    assert multipliers[4] == 1.0 and multipliers[12] == pytest.approx(0.5) and multipliers[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(multipliers[4:], multipliers[5:], strict=False))
    assert warmup_cosine(30, 4, 20, min_ratio=0.1) == pytest.approx(0.1)


def test_a_latest_pointer_to_another_runs_checkpoint_is_refused(uninterrupted, tiny_config_dir, tmp_path):
    """A hand-edited `latest` must not resume another run's state (or any folder outside this run's checkpoints)."""
    reference_args, _ = uninterrupted
    other_run = latest_checkpoint(Path(reference_args.output_dir) / "checkpoints")
    output_dir = tmp_path / "mine"
    shutil.copytree(other_run, output_dir / "checkpoints" / other_run.name)
    pointer = output_dir / "checkpoints" / "latest"
    for crafted in (str(other_run), f"../../elsewhere/checkpoints/{other_run.name}", f"{other_run.name}/../../x"):
        pointer.write_text(crafted + "\n")
        with pytest.raises(CheckpointError, match="latest"):
            latest_checkpoint(output_dir / "checkpoints")
    pointer.write_text(other_run.name + "\n")
    assert latest_checkpoint(output_dir / "checkpoints") == output_dir / "checkpoints" / other_run.name
