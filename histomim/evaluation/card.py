"""Write an evaluation report into a model card: ``model-index`` metadata (``huggingface_hub.EvalResult``)
and a short table beside the random-init baseline in the card's text.

Only the evaluated model's own scores go into ``model-index`` (the Hub attributes every entry to the
model); the random-init twin's appear in the text section. Rerunning on the same data, split and
features replaces that evaluation's entries and leaves other evaluations as they were.
"""

from __future__ import annotations

import re
from pathlib import Path

from .harness import MODEL, RANDOM_INIT, protocol_rows
from .probes import METRICS

TASK_TYPE = "image-classification"
METRIC_NAMES = {"balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1", "auroc": "AUROC (one-vs-rest)"}
SECTION_START, SECTION_END = "<!-- histomim-evaluation:start -->", "<!-- histomim-evaluation:end -->"


def eval_results(report: dict, dataset_name: str, dataset_type: str):
    """One `EvalResult` per protocol and metric of the model (not of its random-init twin)."""
    from huggingface_hub import EvalResult

    split = report["split"]
    split_name = f"test ({split['method']} split, seed {split['seed']}, {split['num_test']} of " \
                 f"{split['num_train'] + split['num_test']})"  # fmt: skip
    features = report["settings"]["features"]
    results = []
    for protocol, metrics in protocol_rows(report["results"][MODEL]).items():
        for metric in METRICS:
            results.append(EvalResult(
                task_type=TASK_TYPE, task_name=f"{dataset_name}: {protocol}, frozen {features} features",
                dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split_name,
                metric_type=metric, metric_value=round(float(metrics[metric]), 4),
                metric_name=METRIC_NAMES[metric], metric_config=f"{protocol} | {features}",
            ))  # fmt: skip
    return results


def _same_evaluation(a, b) -> bool:
    return (a.dataset_type, a.dataset_name, a.dataset_split, a.metric_config) == (
        b.dataset_type, b.dataset_name, b.dataset_split, b.metric_config)  # fmt: skip


def card_section(report: dict, dataset_name: str) -> str:
    """The markdown table of the model and its random-init twin, between markers that a rerun replaces."""
    model_rows, twin_rows = (protocol_rows(report["results"][key]) for key in (MODEL, RANDOM_INIT))
    split, settings = report["split"], report["settings"]
    lines = [
        SECTION_START,
        f"### Evaluation: {dataset_name}",
        "",
        f"Frozen `{settings['features']}` features, {split['method']} split (seed {split['seed']}, "
        f"{split['num_train']} train / {split['num_test']} test); the random-init twin is the same config, "
        f"untrained (torch seed {settings['baseline_seed']}). Produced by `histomim evaluate`.",
        "",
        "| protocol | " + " | ".join(METRIC_NAMES[m] for m in METRICS) + " | random init: "
        + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |",
        "|---" * (1 + 2 * len(METRICS)) + "|",
    ]
    for name, metrics in model_rows.items():
        values = [f"{metrics[m]:.3f}" for m in METRICS] + [f"{twin_rows[name][m]:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    return "\n".join(lines + [SECTION_END])


def write_model_index(folder: str | Path, report: dict, dataset_name: str, dataset_type: str = "custom") -> Path:
    """Add the report to ``folder/README.md`` (created as a bare card if missing) and save it.

    ``model_name`` defaults to the folder's name when the card has none (``model-index`` needs one).
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = Path(folder) / "README.md"
    name = Path(folder).resolve().name
    if path.exists():
        card = ModelCard.load(path)
        data, text = card.data, card.text
    else:
        data, text = ModelCardData(), f"# {name}\n"
    new = eval_results(report, dataset_name, dataset_type)
    kept = [old for old in (data.eval_results or []) if not any(_same_evaluation(old, n) for n in new)]
    data.eval_results = kept + new
    data.model_name = data.model_name or name
    section = card_section(report, dataset_name)
    pattern = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), re.S)
    # one section per evaluation: replace the one for this dataset if present, else append
    heading = f"### Evaluation: {dataset_name}\n"
    existing = [m for m in pattern.finditer(text) if heading in m.group(0)]
    if existing:
        text = text[: existing[0].start()] + section + text[existing[0].end() :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{text.lstrip(chr(10))}")
    card.save(path)
    return path


__all__ = ["write_model_index", "eval_results", "card_section"]
