"""The evaluation harness: embed labelled images with an encoder and with its random-init twin, run every
protocol on one fixed split, and report both side by side.

    report = evaluate_encoder("outputs/histomim-tiny-demo", nucleus_crops(sample_nuclei_pairs()))
    print(format_table(report))

The random-init twin (`random_init_twin`: the same config, untrained, seeded) is the baseline a
pretraining run must beat: on small real data, random ViT features with a tuned linear probe are
often far from chance, so "beats chance" says little and "beats random init" is the claim to check.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from .data import LabelledImages, split_images
from .embeddings import embed_images, image_processor, load_encoder, random_init_twin
from .probes import METRICS, few_shot, knn_probe, linear_probe

MODEL, RANDOM_INIT = "model", "random_init"


@dataclass
class EvaluationSettings:
    """What the harness does; every field is a flag of ``histomim evaluate``."""

    pooling: str = "cls"  # cls | mean | cls+mean
    layer: int | None = None  # None: final normalised output; k: hidden_states[k]
    split: str = "stratified"  # stratified | group
    test_size: float = 0.3
    seed: int = 0  # of the split and of the inner CV
    knn_k: int = 20
    shots: tuple[int, ...] = (1, 4, 8)
    few_shot_seeds: int = 5  # seeds 0 .. n-1
    baseline_seed: int = 0  # torch seed of the random-init twin
    protocols: tuple[str, ...] = ("linear", "knn", "few_shot")
    batch_size: int = 64
    device: str = "cpu"

    @property
    def features(self) -> str:
        """A short name of the embedding, e.g. ``cls/last`` or ``mean/layer-6``."""
        return f"{self.pooling}/{'last' if self.layer is None else f'layer{self.layer}'}"


PROTOCOLS = ("linear", "knn", "few_shot")


def run_protocols(features: np.ndarray, data: LabelledImages, split, settings: EvaluationSettings) -> dict:
    """Every requested protocol on (N, D) ``features`` with the split's train/test indices."""
    args = (features[split.train], data.labels[split.train], features[split.test], data.labels[split.test],
            len(data.class_names))  # fmt: skip
    results = {}
    if "linear" in settings.protocols:
        results["linear"] = linear_probe(*args, seed=settings.seed)
    if "knn" in settings.protocols:
        results["knn"] = knn_probe(*args, k=settings.knn_k)
    if "few_shot" in settings.protocols:
        results["few_shot"] = few_shot(*args, shots=settings.shots, seeds=range(settings.few_shot_seeds))
    return results


def evaluate_encoder(model_or_path, data: LabelledImages, settings: EvaluationSettings | None = None) -> dict:
    """Evaluate an encoder (folder, Hub id or model) and its random-init twin on ``data``.

    Returns a JSON-able report: model, data (classes and counts), split (method, seed, sizes),
    settings, machine, and ``results[MODEL]`` / ``results[RANDOM_INIT]`` per protocol.
    """
    settings = settings or EvaluationSettings()
    unknown = set(settings.protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}")
    encoder, source = load_encoder(model_or_path)
    processor = image_processor(source, encoder.config)
    split = split_images(data, settings.split, settings.test_size, settings.seed)
    encoders = {MODEL: encoder, RANDOM_INIT: random_init_twin(encoder.config, settings.baseline_seed)}
    results = {}
    for name, model in encoders.items():
        features = embed_images(model, data.images, processor, settings.pooling, settings.layer,
                                settings.batch_size, settings.device, desc=f"embedding ({name})")  # fmt: skip
        results[name] = run_protocols(features, data, split, settings)
    test_labels = data.labels[split.test]
    return {
        "model": source or type(encoder).__name__,
        "architecture": type(encoder).__name__,
        "data": {"description": data.description, "classes": data.class_names, "counts": data.class_counts(),
                 "test_counts": {n: int((test_labels == i).sum()) for i, n in enumerate(data.class_names)}},
        "split": split.describe(),
        "settings": {**asdict(settings), "features": settings.features},
        "machine": {"processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "results": results,
    }  # fmt: skip


# -- output ------------------------------------------------------------------------------------------


def protocol_rows(results: dict) -> dict[str, dict]:
    """{row name: metrics} for every protocol of one encoder's results, in table order."""
    rows = {}
    if "linear" in results:
        rows["linear probe"] = results["linear"]
    if "knn" in results:
        rows[f"kNN cosine (k={results['knn']['k']})"] = results["knn"]
    for shots, metrics in results.get("few_shot", {}).items():
        rows[f"{shots}-shot ({len(metrics['seeds'])} seeds)"] = metrics
    return rows


def format_table(report: dict) -> str:
    """A plain-text table: each protocol's metrics for the model and for its random-init twin
    (few-shot rows: mean±std over seeds)."""
    heads = {"balanced_accuracy": "bal.acc", "macro_f1": "macro-F1", "auroc": "AUROC"}
    model_rows, twin_rows = (protocol_rows(report["results"][key]) for key in (MODEL, RANDOM_INIT))
    width = max(len(name) for name in model_rows)

    def cells(metrics):
        return "".join(f"{metrics[m]:<6.3f}" + (f"±{metrics[m + '_std']:<4.2f}" if m + "_std" in metrics else " " * 5)
                       + " " for m in METRICS)  # fmt: skip

    metric_head = "".join(f"{heads[m]:<12}" for m in METRICS)
    split, settings = report["split"], report["settings"]
    lines = [
        f"{report['model']} on {report['data']['description']}",
        f"split: {split['method']}, seed {split['seed']}, {split['num_train']} train / {split['num_test']} test; "
        f"features: {settings['features']}",
        f"{'':<{width}}  {'model':<36}random init (torch seed {settings['baseline_seed']})",
        f"{'protocol':<{width}}  {metric_head}{metric_head}",
    ]
    for name, metrics in model_rows.items():
        lines.append(f"{name:<{width}}  {cells(metrics)}{cells(twin_rows[name])}")
    if "linear" in report["results"][MODEL]:
        chosen = [report["results"][key]["linear"]["C"] for key in (MODEL, RANDOM_INIT)]
        lines.append(f"linear probe C by inner CV on the training split: model {chosen[0]:g}, random init {chosen[1]:g}")
    return "\n".join(lines)


def save_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


__all__ = ["EvaluationSettings", "PROTOCOLS", "evaluate_encoder", "run_protocols", "format_table", "save_report",
           "protocol_rows", "MODEL", "RANDOM_INIT"]  # fmt: skip
