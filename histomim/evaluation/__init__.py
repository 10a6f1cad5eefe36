"""Downstream evaluation of encoders on frozen features: labelled data, embeddings, protocols, reports.

    data.py        labelled images from folders, tables, datasets and nucleus masks; the train/test split
    embeddings.py  CLS / mean / CLS+mean features from any layer of any AutoModel encoder; its random-init twin
    probes.py      linear probe, kNN and few-shot, with balanced accuracy, macro-F1 and AUROC
    harness.py     all of it for an encoder and its random-init twin, as a report and a table
    card.py        the report as model-index in the model card

`histomim evaluate` (`histomim.cli.evaluate`) is the command line.
"""

from .data import LabelledImages, Split, hf_dataset, image_folder, image_table, nucleus_crops, split_images
from .embeddings import embed_images, random_init_twin
from .harness import EvaluationSettings, evaluate_encoder, format_table

__all__ = [
    "LabelledImages", "Split", "image_folder", "image_table", "hf_dataset", "nucleus_crops", "split_images",
    "embed_images", "random_init_twin", "EvaluationSettings", "evaluate_encoder", "format_table",
]  # fmt: skip
