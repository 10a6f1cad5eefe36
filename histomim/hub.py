"""Publish a trained model folder to the Hugging Face Hub: model card, upload folder, upload.

A training run leaves its model at the top of its output folder (`save_pretrained` files, image
processor, modeling code, PNGs) with training-only state in subfolders (``checkpoints/``,
``tiles/``, ``logs/``). Publishing copies the top-level files into a staging folder and uploads
exactly that folder:

    write_model_card(folder, info)          # README.md from model_cards/, checked with ModelCard
    push_to_hub(folder, "org/histomim-vitb") # create_repo(exist_ok=True) + upload_folder(staging)

huggingface_hub is imported inside the functions, so ``import histomim`` stays light.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MODEL_CARDS_DIR = Path(__file__).resolve().parents[1] / "model_cards"
PRETRAINED_TEMPLATE = MODEL_CARDS_DIR / "histomim_pretrained.md"
CARD_TAGS = (
    "histomim",
    "histopathology",
    "pathology",
    "masked-image-modeling",
    "self-supervised-learning",
    "vision-transformer",
    "image-feature-extraction",
)
PIPELINE_TAG = "image-feature-extraction"
LIBRARY_NAME = "transformers"
# Top-level files of a model folder that belong on the Hub; everything in subfolders is training state.
UPLOAD_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".png", ".txt")


# -- model card ------------------------------------------------------------------------------------


def model_card_data(info: dict[str, Any]):
    """The card's YAML metadata: library, pipeline tag, tags (objective included) and license."""
    from huggingface_hub import ModelCardData

    tags = list(CARD_TAGS) + [info["objective"]]
    if info.get("stain"):
        tags.append(str(info["stain"]).lower().replace("&", ""))  # "H&E" -> "he"
    return ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=info.get("license", "apache-2.0"),
        tags=list(dict.fromkeys(tags)),
    )


def render_model_card(info: dict[str, Any], template_path: str | Path | None = None):
    """Fill a card template (Jinja2, `model_cards/`) with the run's ``info`` and check the result.

    ``info`` holds what the template names (architecture, objective, data, training, hardware,
    ``repo_id``, ``license``); `histomim.training.pretrain` builds it from a run.

    Returns:
        huggingface_hub.ModelCard

    Raises:
        FileNotFoundError: the template does not exist.
        ValueError: the rendered card fails `check_model_card`.
    """
    from huggingface_hub import ModelCard

    template_path = Path(template_path or PRETRAINED_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template not found: {template_path}")
    card = ModelCard.from_template(model_card_data(info), template_path=str(template_path), **info)
    return check_model_card(str(card))


def check_model_card(text: str):
    """Parse a rendered card with ``huggingface_hub.ModelCard`` and check what the Hub relies on.

    Offline: metadata (library_name, pipeline_tag, tags, license) and a body without unrendered
    template syntax or empty values. (``ModelCard.validate`` would ask the Hub's server.)

    Raises:
        ValueError: listing every problem found.
    """
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    data = card.data.to_dict()
    problems = []
    if data.get("library_name") != LIBRARY_NAME:
        problems.append(f"library_name is {data.get('library_name')!r}, expected {LIBRARY_NAME!r}")
    if data.get("pipeline_tag") != PIPELINE_TAG:
        problems.append(f"pipeline_tag is {data.get('pipeline_tag')!r}, expected {PIPELINE_TAG!r}")
    missing_tags = {"histopathology", "masked-image-modeling"} - set(data.get("tags") or [])
    if missing_tags:
        problems.append(f"tags lack {sorted(missing_tags)}")
    if not data.get("license"):
        problems.append("no license")
    for leftover in ("{{", "}}", "{%", "%}"):
        if leftover in card.text:
            problems.append(f"unrendered template syntax {leftover!r} in the body")
    if "None" in card.text.replace("NoneType", ""):
        problems.append("a template value rendered as 'None'")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))
    return card


def write_model_card(folder: str | Path, info: dict[str, Any], template_path: str | Path | None = None) -> Path:
    """Render the card for ``info`` and save it as ``folder/README.md``."""
    path = Path(folder) / "README.md"
    render_model_card(info, template_path).save(path)
    return path


# -- upload ----------------------------------------------------------------------------------------


def files_to_upload(model_dir: str | Path) -> list[Path]:
    """The files of ``model_dir`` that get published: top-level weights, configs, code, card and PNGs.

    Raises:
        FileNotFoundError: not a saved model (no config.json or no safetensors weights).
    """
    model_dir = Path(model_dir)
    files = (
        sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in UPLOAD_SUFFIXES)
        if model_dir.is_dir()
        else []
    )
    names = {p.name for p in files}
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise FileNotFoundError(f"{model_dir} holds no saved model (needs config.json and *.safetensors weights)")
    return files


def stage_upload_folder(model_dir: str | Path, staging_dir: str | Path) -> Path:
    """Put `files_to_upload` into ``staging_dir`` (hard links where possible) and return it.

    This folder is exactly what `push_to_hub` uploads.
    """
    staging_dir = Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    for source in files_to_upload(model_dir):
        target = staging_dir / source.name
        try:
            os.link(source, target)  # no copy of multi-GB weights
        except OSError:  # another filesystem, or links not supported
            shutil.copy2(source, target)
    return staging_dir


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload histomim model",
) -> str:
    """Create ``repo_id`` if needed and upload the staged model folder in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="histomim-upload-") as staging:
        folder = stage_upload_folder(model_dir, staging)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message
        )
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "render_model_card",
    "check_model_card",
    "write_model_card",
    "model_card_data",
    "files_to_upload",
    "stage_upload_folder",
    "push_to_hub",
]
