"""Fine-tune an encoder for image classification: full fine-tuning with layer-wise lr decay, or LoRA.

    histomim finetune --model outputs/histomim-tiny-demo --nuclei --epochs 20 --output-dir outputs/ft
    histomim finetune --model M --data tiles_by_class/ --lora-rank 8 --lr 2e-3
    accelerate launch -m histomim.cli finetune --model M --data labels.csv --mixed-precision bf16

The encoder (a histomim pretraining or encoder folder) gets a linear head on its pooled output
(HistoMIMForImageClassification). Images are split as in `histomim evaluate` (--split, --test-size,
--seed); the held-out images are scored at the end (balanced accuracy, macro-F1, AUROC). The output
folder holds the full model (save_pretrained + image processor), or with --lora-rank only the PEFT
adapter (adapter_config.json + adapter_model.safetensors: PeftModel.from_pretrained(base, folder)),
and finetune_summary.json with the per-epoch losses and the test scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.data import SPLITS
from .evaluate import add_data_arguments, load_data


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="histomim encoder or pretraining folder (or Hub id) to start from")
    add_data_arguments(parser)
    parser.add_argument("--output-dir", type=Path, required=True, help="where the fine-tuned model or adapter goes")
    parser.add_argument("--split", choices=SPLITS, default="stratified", help="train/test split (default: %(default)s)")
    parser.add_argument("--test-size", type=float, default=0.3, help="share of images held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, head init, data order and augmentation (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the head (and of LoRA) (default: %(default)s)")
    parser.add_argument("--layer-decay", type=float, default=0.75,
                        help="full fine-tuning: block i of L trains at lr * decay**(L - i), the embeddings at lr * decay**(L + 1) (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay on matrices (default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup before the cosine decay (default: %(default)s)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train LoRA adapters of this rank on the attention qkv/proj linears (and the head) instead of "
                        "the whole model; 0: full fine-tuning (default: %(default)s)")
    parser.add_argument("--lora-alpha", type=int, default=None, help="LoRA scaling alpha (default: 2 x rank)")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is available")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None, help="Accelerate mixed precision")
    return parser.parse_args(argv)


def main(argv=None, prog=None) -> int:
    import torch

    from ..atomic import atomic_path
    from ..evaluation.data import split_images
    from ..evaluation.embeddings import image_processor
    from ..training.finetune import FinetuneSettings, classifier_from_encoder, finetune

    args = parse_args(argv, prog)
    labelled = load_data(args)
    split = split_images(labelled, args.split, args.test_size, args.seed)
    torch.manual_seed(args.seed)
    model = classifier_from_encoder(args.model, labelled.class_names)
    processor = image_processor(args.model if Path(args.model).is_dir() else None, model.config)

    def pixels(indices):
        return processor(images=[labelled.images[int(i)] for i in indices], return_tensors="pt")["pixel_values"]

    settings = FinetuneSettings(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, layer_decay=args.layer_decay,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, seed=args.seed, cpu=args.cpu, mixed_precision=args.mixed_precision,
    )
    labels = torch.as_tensor(labelled.labels)
    result = finetune(model, pixels(split.train), labels[split.train], settings, pixels(split.test), labels[split.test])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(args.output_dir)
    if not args.lora_rank:
        processor.save_pretrained(args.output_dir)
    summary = {"model": args.model, "data": labelled.description, "split": split.describe(),
               "settings": vars(settings), "epoch_losses": result.epoch_losses, "test": result.test_metrics}  # fmt: skip
    with atomic_path(args.output_dir / "finetune_summary.json") as partial:
        partial.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"loss per epoch: {' '.join(f'{v:.3f}' for v in result.epoch_losses)}")
    print("test: " + ", ".join(f"{k} {v:.3f}" for k, v in result.test_metrics.items()))
    print(f"saved {'LoRA adapter' if args.lora_rank else 'model'} to {args.output_dir}")
    return 0
