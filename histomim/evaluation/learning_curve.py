"""Probe quality against pretraining steps: evaluate every checkpoint of a pretraining run on labelled data.

    curve = learning_curve("outputs/nano-nuclei", nucleus_crops(sample_nuclei_pairs()), settings)
    save_learning_curve_plot(curve, "docs/figures/nuclei_learning_curve.png")

Step 0 is the random-init twin of the run's config (`random_init_twin`), so the curve starts at the
baseline that pretraining has to beat. Checkpoints are read from ``<run>/checkpoints/step-*``
(`histomim.training.common` writes the model there as ``model.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

from .data import LabelledImages
from .harness import EvaluationSettings, evaluate_encoder
from .embeddings import random_init_twin

ENCODER_PREFIX = "histomim."  # the encoder's weights inside HistoMIMForPreTraining


def checkpoint_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint of a run, by step."""
    from ..training.common import PARTIAL_PREFIX

    folders = (Path(run_dir) / "checkpoints").glob("*")
    found = []
    for folder in folders:
        digits = "".join(c for c in folder.name if c.isdigit())
        if folder.is_dir() and not folder.is_symlink() and not folder.name.startswith(PARTIAL_PREFIX) and digits:
            found.append((int(digits), folder))
    return sorted(found)


def checkpoint_encoder(checkpoint: str | Path, config):
    """The `HistoMIMModel` encoder saved in a pretraining checkpoint (its objective head is left out)."""
    from safetensors.torch import load_file

    from ..mim import HistoMIMModel

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    encoder = HistoMIMModel(config)
    encoder.load_state_dict({k.removeprefix(ENCODER_PREFIX): v for k, v in state.items() if k.startswith(ENCODER_PREFIX)})
    return encoder.eval()


def learning_curve(run_dir: str | Path, data: LabelledImages, settings: EvaluationSettings, config=None) -> list[dict]:
    """[{step, results, random_init}] for step 0 (the random-init twin) and every checkpoint of ``run_dir``.

    Every point is evaluated with the same split and settings; ``random_init`` repeats the twin's results
    so each point can be read on its own.
    """
    from tqdm.auto import tqdm

    from ..mim import HistoMIMConfig

    config = config or HistoMIMConfig.from_pretrained(run_dir)
    baseline = evaluate_encoder(random_init_twin(config, settings.baseline_seed), data, settings)
    points = [{"step": 0, "results": baseline["results"]["model"], "random_init": baseline["results"]["model"],
               "split": baseline["split"]}]  # fmt: skip
    for step, folder in tqdm(checkpoint_steps(run_dir), desc="evaluating checkpoints", unit="checkpoint"):
        report = evaluate_encoder(checkpoint_encoder(folder, config), data, settings)
        points.append({"step": step, "results": report["results"]["model"], "random_init": report["results"]["random_init"],
                       "split": report["split"]})  # fmt: skip
    return points


def save_learning_curve_plot(points: list[dict], path: str | Path, metric: str = "balanced_accuracy", title: str = "") -> Path:
    """Linear-probe and kNN ``metric`` against pretraining steps, with the random-init twin as dashed lines."""
    from ..plotting import pyplot, save_png

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    steps = [p["step"] for p in points]
    for protocol, colour in (("linear", "tab:blue"), ("knn", "tab:orange")):
        if protocol not in points[0]["results"]:
            continue
        label = "linear probe" if protocol == "linear" else f"kNN (k={points[0]['results']['knn']['k']})"
        axis.plot(steps, [p["results"][protocol][metric] for p in points], "o-", color=colour, label=label)
        axis.axhline(points[0]["random_init"][protocol][metric], color=colour, ls="--", lw=1,
                     label=f"{label}, random init")  # fmt: skip
    axis.set_xlabel("pretraining steps")
    axis.set_ylabel(metric.replace("_", " ") + " (held-out nuclei)")
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_png(figure, path)


__all__ = ["learning_curve", "checkpoint_steps", "checkpoint_encoder", "save_learning_curve_plot"]
