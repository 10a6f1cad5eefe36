"""Fine-tuning a classifier from a SimMIM checkpoint under DistributedDataParallel's default settings:
2 CPU processes (torchrun + gloo), as tests/test_distributed.py runs pretraining."""

from __future__ import annotations

import textwrap
from pathlib import Path

from test_distributed import torchrun

SIMMIM_CHECKPOINT = Path(__file__).resolve().parent / "fixtures" / "histomim-simmim-tiny"

# Each rank fine-tunes its own shard of random tiles for 3 steps, then reports a digest of its weights.
RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch

    torch.set_num_threads(1)  # two processes on two cores
    from accelerate import Accelerator
    from histomim import HistoMIMForImageClassification

    settings = json.loads(sys.argv[1])
    accelerator = Accelerator(cpu=True)  # DDP with its defaults: find_unused_parameters=False
    model = HistoMIMForImageClassification.from_pretrained(settings["checkpoint"], num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    losses = []
    for step in range(3):  # DDP reports a parameter without gradient at the second step
        pixels = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 2, (4,), generator=generator)
        loss = model(pixel_values=pixels, labels=labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = accelerator.unwrap_model(model).state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].detach().contiguous().numpy().tobytes())
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "world_size": accelerator.num_processes, "digest": digest.hexdigest(), "losses": losses,
              "ddp": type(model).__name__, "find_unused_parameters": model.find_unused_parameters}
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as file:
        json.dump(report, file)
    """
)


def test_two_process_fine_tuning_from_a_simmim_checkpoint(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    first, second = torchrun(script, {"checkpoint": str(SIMMIM_CHECKPOINT)}, tmp_path / "reports")
    assert (first["world_size"], first["ddp"], first["find_unused_parameters"]) == (2, "DistributedDataParallel", False)
    assert first["digest"] == second["digest"]  # gradients were all-reduced: the two copies stayed identical
    assert len(first["losses"]) == 3 and first["losses"] != second["losses"]  # each rank trained on its own tiles
