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
    """The demo on the sample slide, shrunk: 64 px tiles at 1 um/px (145 tiles, 4 batches per epoch), 8 steps."""
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
    assert reference.summary["epochs"] == 2.0  # 145 tiles, 4 batches of 32 per epoch: resume lands in epoch 1
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
    assert (data["source"], data["num_tiles"], data["slides"]) == (str(tile_dir), 145, ["CMU-1-Small-Region"])
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


# -- weights checked, settings compared, full disks --------------------------------------------------


def _resume_from_copy(reference_args, checkpoints: Path, output_dir: Path, **overrides) -> PretrainArguments:
    """Resume a copy of the uninterrupted run's checkpoints, on its tiles (no retiling)."""
    shutil.copytree(checkpoints, output_dir / "checkpoints")
    tiles = Path(reference_args.output_dir) / "tiles" / "1mpp-64px"
    settings = dict(output_dir=str(output_dir), data=[str(tiles)], demo=False, resume_from_checkpoint="latest")
    return replace(reference_args, **{**settings, **overrides})


def test_the_summary_loss_is_that_of_the_saved_weights(uninterrupted):
    """The last step's loss is taken before its update; the loss of record is the saved file's, reloaded."""
    from histomim.training.common import seeded_generator
    from histomim.training.pretrain import VISUALIZATION_KEY, visualization_batch

    args, result = uninterrupted
    output_dir = Path(args.output_dir)
    saved = HistoMIMForPreTraining.from_pretrained(output_dir).eval()
    tiles = visualization_batch(result.summary["data"]["source"], saved.config)
    noise = torch.rand(saved.config.mask_noise_shape(len(tiles)), generator=seeded_generator(args.seed, VISUALIZATION_KEY))
    with torch.no_grad():
        expected = float(saved(pixel_values=tiles, noise=noise).loss)
    summary = json.loads((output_dir / "pretrain_summary.json").read_text())
    assert summary["saved_model_loss"] == pytest.approx(expected, abs=1e-6) and summary["saved_model_loss_tiles"] == 6
    assert f"the saved weights, reloaded: {expected:.4f} on 6 fixed tiles" in (output_dir / "README.md").read_text()


def test_a_checkpoint_with_a_non_finite_tensor_is_refused_naming_it(uninterrupted, tmp_path):
    """A flipped bit that makes a weight or an Adam moment NaN: named on resume, not blamed on the learning rate."""
    from safetensors.torch import save_file

    reference_args, _ = uninterrupted
    args = _resume_from_copy(reference_args, Path(reference_args.output_dir) / "checkpoints", tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    weights = load_file(checkpoint / "model.safetensors")
    name = next(n for n, t in weights.items() if n.endswith("blocks.1.attn.qkv.weight"))
    original = weights[name].clone()
    weights[name].view(-1)[7] = float("nan")
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(checkpoint))} \(model 0\) is damaged: tensor '{name}'"):
        pretrain(args)
    AcceleratorState._reset_state(reset_partial_state=True)

    weights[name] = original
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    optimizer["state"][0]["exp_avg_sq"].view(-1)[0] = float("inf")
    torch.save(optimizer, checkpoint / "optimizer.bin")
    with pytest.raises(CheckpointError, match=r"\(optimizer 0\) is damaged: tensor 'param 0.exp_avg_sq'"):
        pretrain(args)


def test_resuming_with_other_settings_is_refused_unless_allowed_and_then_recorded(uninterrupted, tmp_path):
    reference_args, _ = uninterrupted
    checkpoints = Path(reference_args.output_dir) / "checkpoints"
    saved = json.loads((checkpoints / "step_00000006" / "training_state.json").read_text())["settings"]
    assert saved == {"mask_ratio": 0.75, "seed": 0, "batch_size": 32, "grad_accum": 1, "objective": "mae",
                     "image_size": 64}  # fmt: skip
    args = _resume_from_copy(reference_args, checkpoints, tmp_path / "run", mask_ratio=0.5, seed=1,
                             resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "step_00000006"))  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings .*--mask-ratio 0.75 -> 0.5, --seed 0 -> 1.*--allow-config-change"):
        pretrain(args)
    AcceleratorState._reset_state(reset_partial_state=True)

    result = pretrain(replace(args, allow_config_change=True))
    change = {"step": 6, "checkpoint": "step_00000006", "changes": {"mask_ratio": [0.75, 0.5], "seed": [0, 1]}}
    assert result.summary["config_changes"] == [change] and len(result.losses) == 8
    assert result.model.config.mask_ratio == 0.5
    final = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "training_state.json").read_text())
    assert final["config_changes"] == [change] and final["settings"]["seed"] == 1  # kept for later resumes
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Resumed with changed settings | at step 6 (step_00000006): mask_ratio 0.75 -> 0.5, seed 0 -> 1" in card


def _diverging_last_update(monkeypatch, at_step: int) -> list[str]:
    """Make the optimizer's update number ``at_step`` write a NaN into the first weight (a diverged update)."""
    from histomim.training import pretrain as pretrain_module

    poisoned = []

    def make_diverging_adamw(model, *args, **kwargs):
        optimizer = make_adamw(model, *args, **kwargs)
        updates = []

        def diverge(optimizer, step_args, step_kwargs) -> None:
            updates.append(1)
            if len(updates) == at_step:
                name, weight = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
                with torch.no_grad():
                    weight.view(-1)[0] = float("nan")
                poisoned.append(name)

        optimizer.register_step_post_hook(diverge)
        return optimizer

    from histomim.training.common import make_adamw

    monkeypatch.setattr(pretrain_module, "make_adamw", make_diverging_adamw)
    return poisoned


def test_non_finite_weights_are_never_saved_as_checkpoint_or_model(uninterrupted, tmp_path, monkeypatch):
    """The last update diverging leaves a finite last loss (taken before it): the weights are checked at every save."""
    reference_args, _ = uninterrupted
    tiles = Path(reference_args.output_dir) / "tiles" / "1mpp-64px"
    run = replace(reference_args, data=[str(tiles)], demo=False, max_steps=2)
    poisoned = _diverging_last_update(monkeypatch, at_step=2)
    with pytest.raises(FloatingPointError, match=r"not saving the checkpoint of step 2 .*`latest` stays on the previous one: tensor '.+' holds NaN"):
        pretrain(replace(run, output_dir=str(tmp_path / "a"), checkpointing_steps=1))
    assert poisoned and (tmp_path / "a" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "a" / "checkpoints" / "step_00000002").exists()
    AcceleratorState._reset_state(reset_partial_state=True)

    with pytest.raises(FloatingPointError, match=rf"not saving the final model to .*tensor '{re.escape(poisoned[0])}'"):
        pretrain(replace(run, output_dir=str(tmp_path / "b"), checkpointing_steps=0))
    assert not list((tmp_path / "b").glob("*.safetensors")) and not (tmp_path / "b" / "pretrain_summary.json").exists()


def test_a_full_disk_during_a_checkpoint_save_keeps_latest_and_removes_the_partial_folder(tmp_path, monkeypatch):
    import errno

    import accelerate.utils.other
    from accelerate import Accelerator

    from histomim.training.common import load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model, optimizer = torch.nn.Linear(4, 2), None
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(accelerator, checkpoints, 1, {})

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 64)  # the start of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", full_disk)
    target = re.escape(str(checkpoints / "step_00000002"))
    with pytest.raises(OSError, match=rf"no space left on device while saving checkpoint {target} .*still names step_00000001"):
        save_checkpoint(accelerator, checkpoints, 2, {})
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]  # no partial folder left
    assert load_checkpoint(accelerator, latest_checkpoint(checkpoints))["step"] == 1

def test_truncated_tile_images_are_named_skipped_and_counted(sample_slide_path, tiny_config_dir, tmp_path, capsys):
    from histomim.data.slides import open_slide

    folder = tmp_path / "tile_images"
    folder.mkdir()
    with open_slide(sample_slide_path) as slide:  # 16 tiles of real tissue, one JPEG cut short
        for i in range(16):
            slide.read_tile((400 + 96 * (i % 8), 1700 + 96 * (i // 8)), 0, 96, 64).save(folder / f"tile{i:02d}.jpg")
    cut = folder / "tile05.jpg"
    cut.write_bytes(cut.read_bytes()[:1500])  # a copy cut short by a full disk or a killed transfer
    with pytest.warns(UserWarning, match="skipped an unreadable tile: .*tile05.jpg") as warned:
        result = pretrain(small_run(tiny_config_dir, tmp_path / "run", data=[str(folder)], batch_size=8,
                                    max_steps=3, checkpointing_steps=0))  # fmt: skip
    assert len(result.losses) == 3  # the run went on
    assert {type(w.message).__name__ for w in warned if "tile05" in str(w.message)} == {"TileReadWarning"}
    assert "1 unreadable tiles were skipped" in capsys.readouterr().out
