"""Probe quality against pretraining steps over repeated splits: every checkpoint of a pretraining run and the
random-init twin, on the same labelled images and the same splits, compared split by split.

    points = learning_curve("outputs/nano-nuclei", nuclei, settings, split_seeds=range(20))
    save_learning_curve_plot(points, "docs/figures/nuclei_learning_curve.png")

One split of a hundred nuclei moves balanced accuracy by several points per nucleus, so every encoder is
probed on ``split_seeds`` stratified splits (`split_images` with each seed) and reported as mean ± std,
with the paired difference to the random-init twin *on the same split* (`paired_summary`): its mean, std,
the fraction of splits won and the one-sided p-value of the corrected resampled t-test (`corrected_paired_p`). Step 0 is the twin (`random_init_twin`), so the curve starts at the
baseline that pretraining has to beat. Checkpoints are read from ``<run>/checkpoints/step-*``
(`histomim.training.common` writes the model there as ``model.safetensors``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from .data import LabelledImages, split_images
from .embeddings import embed_images, image_processor, random_init_twin
from .harness import EvaluationSettings, run_protocols

ENCODER_PREFIX = "histomim."  # the encoder's weights inside HistoMIMForPreTraining
SCORE = "balanced_accuracy"


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
    """The encoder (`AutoModel` of ``config``: a `HistoMIMModel`, or the ConvNeXt's) saved in a pretraining
    checkpoint, its objective head left out."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    import histomim  # noqa: F401  (registers the Auto classes)

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    encoder = AutoModel.from_config(config)
    # the encoder's own weights only: SimMIM/BEiT/latent checkpoints also hold the mask token, which inference
    # never uses; a weight the encoder needs and the checkpoint lacks still fails the strict load
    wanted = encoder.state_dict().keys()
    encoder.load_state_dict({key: value for key, value in ((k.removeprefix(ENCODER_PREFIX), v) for k, v in state.items()
                             if k.startswith(ENCODER_PREFIX)) if key in wanted})  # fmt: skip
    return encoder.eval()


def repeated_split_scores(
    features: np.ndarray, data: LabelledImages, settings: EvaluationSettings, split_seeds: Iterable[int]
) -> dict[str, list[float]]:
    """{protocol: [balanced accuracy on the split of each seed]} for (N, D) ``features`` of ``data``.

    Each split is ``split_images(data, settings.split, settings.test_size, seed)``; the linear probe's inner
    CV uses the same seed. BLAS runs on one thread: on problems this small, threads cost more than they save
    (a linear probe of 100 x 128 features is about 5x faster on one thread than on two busy cores).
    """
    from threadpoolctl import threadpool_limits

    scores: dict[str, list[float]] = {protocol: [] for protocol in settings.protocols if protocol != "few_shot"}
    with threadpool_limits(limits=1):
        for seed in split_seeds:
            split = split_images(data, settings.split, settings.test_size, seed)
            results = run_protocols(features, data, split, replace(settings, seed=seed, protocols=tuple(scores)))
            for protocol in scores:
                scores[protocol].append(results[protocol][SCORE])
    return scores


def paired_summary(scores: Iterable[float], baseline: Iterable[float], test_fraction: float | None = None) -> dict:
    """Mean and std of ``scores`` over splits, and of the paired difference ``scores - baseline`` (both on the
    same splits, in the same order), with the fraction of splits where the difference is > 0 (won) and == 0;
    given the splits' ``test_fraction``, also `corrected_paired_p` of the difference (else None)."""
    scores, baseline = np.asarray(list(scores), dtype=float), np.asarray(list(baseline), dtype=float)
    if scores.shape != baseline.shape or scores.size == 0:
        raise ValueError(f"paired scores need the same, non-zero number of splits; got {scores.size} and {baseline.size}")
    difference = scores - baseline
    p_value = corrected_paired_p(difference, test_fraction) if test_fraction is not None and scores.size > 1 else None
    return {
        "mean": float(scores.mean()), "std": float(scores.std()),
        "difference_mean": float(difference.mean()), "difference_std": float(difference.std()),
        "won": float((difference > 0).mean()), "tied": float((difference == 0).mean()), "splits": int(scores.size),
        "p_value": p_value,
    }  # fmt: skip


def corrected_paired_p(difference: np.ndarray, test_fraction: float) -> float:
    """One-sided p-value of "the mean paired difference is > 0" over J repeated random splits, by the corrected
    resampled t-test (Nadeau & Bengio, 2003; the one scikit-learn's model-comparison example uses).

    The splits reuse the same images, so their differences are correlated and the plain t-test's variance of the
    mean (var / J) is far too small; the correction widens it to var * (1 / J + n_test / n_train), which does not
    vanish with more splits: only more labelled images make a small difference certain.
    """
    from scipy import stats

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    splits, mean, variance = difference.size, float(difference.mean()), float(difference.var(ddof=1))
    if variance == 0:  # the same difference on every split: certain either way
        return 0.0 if mean > 0 else 1.0
    t = mean / np.sqrt(variance * (1 / splits + test_fraction / (1 - test_fraction)))
    return float(stats.t.sf(t, df=splits - 1))


def curve_point(step: int, scores: dict[str, list[float]], baseline: dict[str, list[float]],
                test_fraction: float | None = None) -> dict:  # fmt: skip
    """One point of a learning curve: the per-split scores and their paired summary against the twin."""
    return {"step": step, "scores": scores,
            "summary": {p: paired_summary(scores[p], baseline[p], test_fraction) for p in scores}}  # fmt: skip


def learning_curve(
    run_dir: str | Path,
    data: LabelledImages,
    settings: EvaluationSettings,
    split_seeds: Iterable[int] = range(20),
    config=None,
    steps: Iterable[int] | None = None,
) -> list[dict]:
    """[`curve_point`] for step 0 (the random-init twin) and every checkpoint of ``run_dir`` (or those of
    ``steps``), each embedded once with ``settings``' pooling and layer and probed on the same ``split_seeds``
    splits."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig

    import histomim  # noqa: F401  (registers the Auto classes)

    config = config or AutoConfig.from_pretrained(str(run_dir))
    checkpoints = checkpoint_steps(run_dir)
    if steps is not None:
        steps = set(steps)
        if missing := steps - {step for step, _ in checkpoints}:
            raise ValueError(f"{run_dir}: no checkpoint at step(s) {sorted(missing)}; it has {[s for s, _ in checkpoints]}")
        checkpoints = [(step, folder) for step, folder in checkpoints if step in steps]
    split_seeds = list(split_seeds)
    processor = image_processor(None, config)

    def scores_of(encoder) -> dict[str, list[float]]:
        features = embed_images(encoder, data.images, processor, settings.pooling, settings.layer,
                                settings.batch_size, settings.device)  # fmt: skip
        return repeated_split_scores(features, data, settings, split_seeds)

    baseline = scores_of(random_init_twin(config, settings.baseline_seed))
    points = [curve_point(0, baseline, baseline, settings.test_size)]
    for step, folder in tqdm(checkpoints, desc="evaluating checkpoints", unit="checkpoint"):
        points.append(curve_point(step, scores_of(checkpoint_encoder(folder, config)), baseline, settings.test_size))
    return points


def save_learning_curve_plot(points: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels against pretraining steps: each protocol's mean balanced accuracy (± std over splits, shaded)
    with the random-init twin dashed, and the paired difference to the twin (mean ± std over the same splits)."""
    from ..plotting import save_png, subplots

    figure, (scores_axis, difference_axis) = subplots(1, 2, figsize=(10, 4.2))
    steps = np.array([p["step"] for p in points])
    splits = next(iter(points[0]["summary"].values()))["splits"]
    for protocol, colour in (("linear", "tab:blue"), ("knn", "tab:orange")):
        if protocol not in points[0]["summary"]:
            continue
        label = "linear probe" if protocol == "linear" else "kNN"
        summaries = [p["summary"][protocol] for p in points]
        mean, std = (np.array([s[key] for s in summaries]) for key in ("mean", "std"))
        scores_axis.plot(steps, mean, "o-", color=colour, label=f"{label}, pretrained")
        scores_axis.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.15)
        scores_axis.axhline(mean[0], color=colour, ls="--", lw=1, label=f"{label}, random init (step 0)")
        difference, spread = (np.array([s[key] for s in summaries]) for key in ("difference_mean", "difference_std"))
        difference_axis.errorbar(steps, difference, yerr=spread, fmt="o-", color=colour, capsize=3, label=label)
    scores_axis.set_ylabel(f"balanced accuracy (mean ± std, {splits} splits)")
    difference_axis.axhline(0, color="black", lw=1)
    difference_axis.set_ylabel("pretrained - random init, same split (mean ± std)")
    for axis in (scores_axis, difference_axis):
        axis.set_xlabel("pretraining steps")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return save_png(figure, path)


__all__ = ["learning_curve", "checkpoint_steps", "checkpoint_encoder", "repeated_split_scores", "paired_summary",
           "corrected_paired_p", "curve_point", "save_learning_curve_plot"]  # fmt: skip
