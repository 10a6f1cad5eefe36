"""The model card (README.md) saved next to every fusion model that ``histomim survival`` writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..atomic import atomic_path
from ..resources import resource_dir

TEMPLATE = "histofusion_survival.md"
LINEAR_TEXT = {
    "only": "the elastic-net Cox alone",
    "both": "elastic-net Cox plus the network trained on top of it",
    "none": "the network alone",
}


def histology_text(estimator) -> str | None:
    """How the histology path was trained, for the card's table; ``None`` without histology."""
    config = estimator.model_.config
    if "histology" not in config.modalities:
        return None
    if config.histology_encoder is None:
        return f"precomputed tile features ({config.histology_feature_dim}-d) -> attention MIL"
    encoder = f"`{estimator.histology_encoder}`" if getattr(estimator, "histology_encoder", None) else "a histomim ViT"
    tuning = (
        f"LoRA rank {estimator.lora_rank} on {', '.join(estimator.lora_target_modules)} (merged into these weights; "
        f"the adapters alone, PEFT format, in `histology_lora/`)"
        if getattr(estimator, "lora_rank", 0)
        else "frozen"
    )
    return f"tiles -> {encoder} ({tuning}) -> attention MIL"


def write_model_card(
    estimator, folder: str | Path, num_patients: int, num_events: int, training_text: str, evaluation_text: str,
    repo_id: str = "<repo id>",
) -> Path:  # fmt: skip
    """Render the card of a fitted ``SurvivalEstimator``'s saved model into ``folder/README.md`` (atomically)."""
    import torch
    import transformers
    from huggingface_hub import ModelCard, ModelCardData

    import histomim

    config = estimator.model_.config
    settings: Mapping[str, object] = {
        k: v for k, v in estimator.get_params().items() if k not in ("device", "verbose", "pathways")
    }
    info = {
        "model_name": Path(folder).name if repo_id == "<repo id>" else repo_id.split("/")[-1],
        "repo_id": repo_id,
        "modalities": config.modalities,
        "fusion": config.fusion,
        "head_text": "Cox (partial likelihood)" if config.head == "cox" else f"discrete-time ({config.num_bins} bins)",
        "genomic_linear": config.genomic_linear,
        "linear_mode": estimator.linear_,
        "linear_text": LINEAR_TEXT[estimator.linear_],
        "num_features": config.genomic_num_features,
        "pathways": len(config.genomic_pathways or {}),
        "hidden_size": config.hidden_size,
        "parameters": f"{sum(p.numel() for p in estimator.model_.parameters()):,}",
        "num_patients": num_patients,
        "num_events": num_events,
        "settings": ", ".join(f"{k}={v}" for k, v in settings.items()),
        "histology_text": histology_text(estimator),
        "training_text": training_text,
        "evaluation_text": evaluation_text,
        "histomim_version": getattr(histomim, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    from ..run_report import is_hub_id

    base_model = getattr(estimator, "histology_encoder", None)
    data = ModelCardData(
        library_name="transformers", license="other", tags=["histomim", "survival-analysis", "multimodal"],
        base_model=base_model if base_model and is_hub_id(base_model) else None,
    )  # fmt: skip
    card = ModelCard.from_template(data, template_path=str(resource_dir("model_cards") / TEMPLATE), **info)
    path = Path(folder) / "README.md"
    with atomic_path(path) as partial:
        partial.write_text(str(card))
    return path


__all__ = ["write_model_card"]
