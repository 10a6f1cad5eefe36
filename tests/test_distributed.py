"""Data-parallel pretraining: 2 CPU processes (torchrun + gloo) train, stay identical, save once and resume exactly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from histomim import HistoMIMForPreTraining

from conftest import tiny_config

# Each rank trains through the public API, then dumps a digest of its own copy of the weights.
RANK_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch

    torch.set_num_threads(1)  # two processes on two cores
    from histomim.training.pretrain import PretrainArguments, pretrain

    result = pretrain(PretrainArguments(demo=True, **json.loads(sys.argv[1])))
    state = result.model.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "digest": digest.hexdigest(),
              "losses": result.losses, "num_processes": result.summary["num_processes"],
              "global_batch_size": result.summary["global_batch_size"], "hardware": result.summary["hardware"]}
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as file:
        json.dump(report, file)
    """
)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def torchrun(script: Path, settings: dict, reports: Path) -> list[dict]:
    """Run ``script`` on 2 CPU processes; returns each rank's report."""
    reports.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), json.dumps(settings), str(reports)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((reports / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def run_settings(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    tiny_config().save_pretrained(root / "config")
    (root / "rank.py").write_text(RANK_SCRIPT)
    return dict(
        config=str(root / "config"), output_dir=str(root / "run"), image_size=64, mpp=1.0, batch_size=16,
        grad_accum=2, max_steps=4, base_lr=0.02, warmup_steps=1, checkpointing_steps=2, cpu=True,
    )  # fmt: skip


def test_two_process_run_keeps_ranks_identical_and_resumes_exactly(run_settings, tmp_path):
    script = Path(run_settings["config"]).parent / "rank.py"
    first, second = torchrun(script, run_settings, tmp_path / "reports")
    assert (first["world_size"], second["world_size"], first["num_processes"]) == (2, 2, 2)
    assert first["hardware"].startswith("2 processes on CPU")
    assert first["global_batch_size"] == 16 * 2 * 2  # per-device batch x processes x accumulation
    assert first["digest"] == second["digest"]  # DDP kept the two copies in step
    assert first["losses"] == second["losses"] and len(first["losses"]) == 4  # losses are reduced over ranks

    # the main process saved those weights, once; they moved away from the initialisation
    output_dir = Path(run_settings["output_dir"])
    saved = load_file(output_dir / "model.safetensors")
    assert state_digest(saved) == first["digest"]
    torch.manual_seed(run_settings.get("seed", 0))
    assert not torch.equal(
        saved["histomim.blocks.0.mlp.fc1.weight"],
        HistoMIMForPreTraining(tiny_config()).histomim.blocks[0].mlp.fc1.weight,
    )
    checkpoint = output_dir / "checkpoints" / "step_00000002"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}

    # 2 processes resume from step 2 to the same losses and weights
    resumed_settings = {
        **run_settings,
        "output_dir": str(tmp_path / "resumed"),
        "resume_from_checkpoint": str(checkpoint),
    }
    resumed, _ = torchrun(script, resumed_settings, tmp_path / "resumed-reports")
    assert resumed["losses"] == pytest.approx(first["losses"], abs=1e-6)
    assert resumed["digest"] == first["digest"]
