"""Publish a trained model folder to the Hugging Face Hub: model card, upload folder, upload.

A training run leaves its model at the top of its output folder (`save_pretrained` files, image
processor, modeling code, PNGs) with training-only state in subfolders (``checkpoints/``,
``tiles/``, ``logs/``). Publishing stages an explicit allow-list of those files (`files_to_upload`:
weights, configs, the model's own code, card, PNGs, the run summary; never any other ``*.json`` or
``*.txt``, such as a token file) and uploads exactly that folder, to a private repository unless
asked otherwise:

    write_model_card(folder, info)          # README.md from model_cards/, checked with ModelCard
    push_to_hub(folder, "org/histomim-vitb") # create_repo(private=True, exist_ok=True) + upload_folder(staging)

huggingface_hub is imported inside the functions, so ``import histomim`` stays light.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

PRETRAINED_TEMPLATE = "histomim_pretrained.md"  # in model_cards/, shipped as histomim.model_cards
CARD_TAGS = (
    "histomim",
    "histology",
    "histopathology",
    "pathology",
    "masked-image-modeling",
    "self-supervised-learning",
    "vision-transformer",
    "image-feature-extraction",
)
PIPELINE_TAG = "image-feature-extraction"
LIBRARY_NAME = "transformers"
# Stain names -> Hub tags that say what they are ("H&E" would become "he").
STAIN_TAGS = {"h&e": "hematoxylin-and-eosin", "he": "hematoxylin-and-eosin", "ihc": "immunohistochemistry"}
# The allow-list of top-level files that get published (plus the model's code, see `code_files`);
# everything else, in subfolders or not, stays local.
UPLOAD_PATTERNS = (
    "config.json", "preprocessor_config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "README.md", "*.png", "pretrain_summary.json",
)  # fmt: skip


def model_cards_dir() -> Path:
    """The card templates of ``model_cards/`` (shipped inside the package)."""
    from .resources import resource_dir

    return resource_dir("model_cards")


# -- model card ------------------------------------------------------------------------------------


def model_card_data(info: dict[str, Any]):
    """The card's YAML metadata, as pathology models on the Hub carry it.

    Library, pipeline tag, tags (objective and stain included), license (with ``license_name`` and
    ``license_link`` for ``other``), ``datasets`` (Hub dataset ids), ``base_model`` when initialised
    from another model, and gating fields when ``gated_prompt`` is given.

    Raises:
        ValueError: license ``other`` without a name and link.
    """
    from huggingface_hub import ModelCardData

    tags = list(CARD_TAGS) + [info["objective"]]
    if info.get("stain"):
        stain = str(info["stain"]).strip()
        tags.append(STAIN_TAGS.get(stain.lower(), stain.lower().replace("&", "-and-").replace(" ", "-")))
    license = info.get("license", "apache-2.0")
    extra: dict[str, Any] = {}
    if license == "other":
        if not info.get("license_name") or not info.get("license_link"):
            raise ValueError("license 'other' needs license_name and license_link (--license-name, --license-link)")
        extra.update(license_name=info["license_name"], license_link=info["license_link"])
    if info.get("gated_prompt"):
        extra["extra_gated_prompt"] = info["gated_prompt"]
        extra["extra_gated_fields"] = {name: "text" for name in info.get("gated_fields") or ()}
    return ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license,
        tags=list(dict.fromkeys(tags)),
        datasets=list(info.get("datasets") or []) or None,
        base_model=info.get("base_model") or None,
        **extra,
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

    template_path = Path(template_path or model_cards_dir() / PRETRAINED_TEMPLATE)
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
    """The files of ``model_dir`` that get published: the allow-listed top-level files and the model's code.

    Raises:
        FileNotFoundError: not a saved model (no config.json or no safetensors weights).
    """
    model_dir = Path(model_dir)
    top_level = [p for p in model_dir.iterdir() if p.is_file()] if model_dir.is_dir() else []
    files = [p for p in top_level if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in UPLOAD_PATTERNS)]
    names = {p.name for p in files}
    if "config.json" not in names or not any(name.endswith(".safetensors") for name in names):
        raise FileNotFoundError(f"{model_dir} holds no saved model (needs config.json and *.safetensors weights)")
    return sorted(files + code_files(model_dir))


def code_files(model_dir: Path) -> list[Path]:
    """The ``*.py`` files the saved model needs for ``trust_remote_code``: the modules its config's
    ``auto_map`` names and, transitively, the sibling modules they import relatively."""
    modules = []
    for config_file in (model_dir / "config.json", model_dir / "preprocessor_config.json"):
        auto_map = json.loads(config_file.read_text()).get("auto_map", {}) if config_file.is_file() else {}
        # "repo--module.Class" or "module.Class" -> "module"
        modules += [reference.split("--")[-1].split(".")[0] for reference in flat_values(auto_map)]
    found: dict[str, Path] = {}
    while modules:
        name = modules.pop()
        path = model_dir / f"{name}.py"
        if name in found or not path.is_file():
            continue
        found[name] = path
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                modules += [node.module] if node.module else [alias.name for alias in node.names]
    return list(found.values())


def flat_values(mapping: dict) -> list[str]:
    """String values of an ``auto_map`` (a value may be a [slow, fast] pair with None)."""
    values = []
    for value in mapping.values():
        values += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return values


def stage_upload_folder(
    model_dir: str | Path, staging_dir: str | Path, replace_files: dict[str, str] | None = None
) -> Path:
    """Put `files_to_upload` into ``staging_dir`` (hard links where possible) and return it.

    ``replace_files`` maps file names to the text published in their place (e.g. a redacted run summary).
    This folder is exactly what `push_to_hub` uploads.
    """
    staging_dir = Path(staging_dir)
    staging_dir.mkdir(parents=True, exist_ok=True)
    replace_files = replace_files or {}
    for source in files_to_upload(model_dir):
        target = staging_dir / source.name
        if source.name in replace_files:
            target.write_text(replace_files[source.name])
            continue
        try:
            os.link(source, target)  # no copy of multi-GB weights
        except OSError:  # another filesystem, or links not supported
            shutil.copy2(source, target)
    return staging_dir


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    private: bool = True,
    token: str | None = None,
    commit_message: str = "Upload histomim model",
    replace_files: dict[str, str] | None = None,
) -> str:
    """Create ``repo_id`` if needed (private unless ``private=False``) and upload the staged model folder in
    one commit; returns the commit URL. Models trained on patient-derived data should stay private until
    someone decides otherwise."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="histomim-upload-") as staging:
        folder = stage_upload_folder(model_dir, staging, replace_files)
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
    "code_files",
    "model_cards_dir",
    "stage_upload_folder",
    "push_to_hub",
]
