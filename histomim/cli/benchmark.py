"""Benchmark histomim's MIM training step against transformers' own models, side by side in one run.

GPU, the performance targets (eager and compiled, ratios against both transformers rows):
    histomim benchmark --preset histomim-vitb16 --batch-size 256 --compile none default --json bench.json
What each optimisation buys (histomim without SDPA, without fused AdamW; with float8 linears):
    histomim benchmark --objectives mae --compile default --ablations --float8
CPU smoke run:
    histomim benchmark --device cpu --preset histomim-vit-tiny16 --image-size 64 --batch-size 8
Tile-embedding (feature extraction) throughput against a plain transformers ViTModel of the same size:
    histomim benchmark --extraction --device cpu --preset histomim-vit-tiny16 --dtype fp32 --batch-size 32
Will ViT-L MAE at batch 256 fit? (an estimate on fake tensors, no GPU needed):
    histomim benchmark --preset histomim-vitl16 --objectives mae --batch-size 256 --estimate-memory
"""

import argparse
import json
from pathlib import Path

from .. import HistoMIMConfig
from ..atomic import atomic_path
from ..training.benchmark import (
    data_pipeline_throughput, estimate_training_memory, extraction_throughput, format_report, objective_config, run_benchmark,
    save_benchmark_plot, standard_variants,
)
from ..presets import config_source

COMPILE_MODES = ["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]


def parse_args(argv=None, prog=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="histomim-vitb16",
                        help="preset folder name under hub_configs/, or a path to a config folder (default: %(default)s)")
    parser.add_argument("--objectives", nargs="+", default=["mae", "simmim", "beit"],
                        choices=["mae", "simmim", "beit", "fcmae"],
                        help="objectives to benchmark, each against its transformers reference: ViTMAEForPreTraining, "
                        "ViTForMaskedImageModeling, BeitForMaskedImageModeling (BEiT with random codes as labels over an "
                        "8192-code codebook, without relative position bias); fcmae: the histomim-convnext-atto CNN at "
                        "the same image size against transformers' ConvNextModel masking only its input (default: mae simmim beit)")
    parser.add_argument("--device", default="cuda", help="torch device, e.g. cuda or cpu (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per training step (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="override the preset's image size (e.g. 64 for CPU)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps; the median is reported (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed warm-up steps; compiled rows compile during these (default: %(default)s)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="autocast dtype; fp32 disables autocast (default: %(default)s)")
    parser.add_argument("--compile", nargs="+", default=["none"], choices=COMPILE_MODES, metavar="MODE",
                        help="run both implementations once per torch.compile mode listed; 'none' is eager "
                             f"(choices: {', '.join(COMPILE_MODES)}; default: none). Compiling takes about a "
                             "minute per row on a GPU")
    parser.add_argument("--ablations", action="store_true",
                        help="add histomim rows without SDPA (matmul + softmax attention) and without fused AdamW, under "
                             "the first --compile mode, to show what each buys")
    parser.add_argument("--float8", action="store_true",
                        help="add a histomim row with torchao float8 linears under the last --compile mode "
                             "(needs torchao and an Ada/Hopper GPU; not exact, so its loss difference is reported)")
    parser.add_argument("--peak-matmul-size", type=int, default=8192,
                        help="side of the square matmul that measures the MFU peak (default: %(default)s)")
    parser.add_argument("--data-pipeline", action="store_true",
                        help="also measure input-pipeline throughput on the real sample slide (tile reading, "
                             "decoding and augmentation per CPU core; --augment-on-device's batches on --device)")
    parser.add_argument("--extraction", action="store_true",
                        help="only measure feature extraction instead of training steps: tiles/s of HistoMIMModel and of a "
                        "transformers ViTModel with the same weights on the same real tiles of the sample slide, their ratio "
                        "and output difference (--batch-size, --dtype; --steps timed passes, the best is reported)")
    parser.add_argument("--num-tiles", type=int, default=256, help="with --extraction: tiles per timed pass (default: %(default)s)")
    parser.add_argument("--estimate-memory", action="store_true",
                        help="only estimate the peak memory of a histomim training step at --batch-size for the "
                             "first of --objectives (fake tensors: no GPU needed, no step run) and exit")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also write a PNG bar chart of img/s per row (with MFU and ratio) to this file")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the report as JSON to this file, rewritten after every row so that a run "
                             "cut short keeps what it measured")
    return parser.parse_args(argv)


def write_json(path: Path, output: dict) -> None:
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(output, indent=2))


def main(argv=None, prog=None) -> int:
    args = parse_args(argv, prog)
    overrides = {"image_size": args.image_size} if args.image_size else {}
    config = HistoMIMConfig.from_pretrained(config_source(args.preset), **overrides)
    if args.estimate_memory:
        estimate = estimate_training_memory(objective_config(config, args.objectives[0]), args.batch_size, args.dtype)
        print(f"{args.preset} {args.objectives[0]}, batch {args.batch_size}, {args.dtype}: estimated peak "
              f"{estimate['total']:.1f} GiB (" + ", ".join(f"{kind} {gib:.2f}" for kind, gib in estimate.items()
                                                     if kind != "total" and gib > 0) + ")")  # fmt: skip
        if args.json:
            write_json(args.json, {"estimated_peak_memory_gib": estimate})
        return 0
    if args.extraction:
        figures = extraction_throughput(config, args.device, args.batch_size, args.num_tiles, args.dtype, args.steps)
        print(f"feature extraction, {args.preset} at {config.image_size} px, batch {args.batch_size}, {args.dtype}, "
              f"{figures['device']}: histomim {figures['histomim_tiles_per_s']:.1f} tiles/s, transformers ViTModel "
              f"{figures['vit_tiles_per_s']:.1f} tiles/s, ratio {figures['ratio']:.2f}x "
              f"(max |difference| of the hidden states {figures['max_abs_difference']:.1e}; {figures['tiles']})")
        if args.json:
            write_json(args.json, {"extraction": figures})
        return 0
    compile_modes = tuple(None if mode == "none" else mode for mode in args.compile)
    report = run_benchmark(
        config, objectives=tuple(args.objectives), device=args.device, batch_size=args.batch_size,
        steps=args.steps, warmup=args.warmup, dtype=args.dtype, peak_matmul_size=args.peak_matmul_size,
        variants=standard_variants(compile_modes, float8=args.float8, ablations=args.ablations),
        on_result=(lambda partial: write_json(args.json, partial.to_dict())) if args.json else None,
    )
    print(format_report(report))
    if args.plot:
        print(f"plot: {save_benchmark_plot(report, args.plot)}")
    output = report.to_dict()
    if args.data_pipeline:
        output["data_pipeline"] = data_pipeline_throughput(image_size=config.image_size, device=args.device)
        print("input pipeline (img/s):", json.dumps(output["data_pipeline"], indent=2))
    if args.json:
        write_json(args.json, output)
    return 0
