"""Accelerate helpers shared by the training loops: seeding, optimizer and schedule, atomic
checkpoints with exact resume, metrics and run metadata.

Checkpoints live in ``<output_dir>/checkpoints/``::

    checkpoints/
      step_00000200/        one complete `Accelerator.save_state` folder + training_state.json
      step_00000400/
      latest                text file naming the newest complete checkpoint ("step_00000400")
      .partial-step_...     a save in progress (or one killed mid-write); never resumed from

A save writes into ``.partial-<name>`` and only then renames it to ``<name>`` (one atomic
``os.replace``) and repoints ``latest`` (a second one). A kill at any moment therefore leaves
``latest`` on a complete checkpoint. All processes must see the same ``checkpoints/`` folder
(a shared filesystem on multi-node runs), as `Accelerator.save_state` itself assumes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_path
from ..paths import child_path

CHECKPOINT_PREFIX = "step_"
PARTIAL_PREFIX = ".partial-"
LATEST_NAME = "latest"
TRAINING_STATE_NAME = "training_state.json"
# Parameters that MAE/BEiT exclude from weight decay besides biases and norm weights (any 1-D tensor).
NO_DECAY_NAMES = ("cls_token", "mask_token", "register_tokens", "position_embeddings")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or loaded; the message names the path."""


# -- finite weights --------------------------------------------------------------------------------


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def require_finite(tensors: Mapping[str, torch.Tensor], what: str, error: type[Exception] = FloatingPointError) -> None:
    """Raise ``error`` naming the first non-finite tensor of ``tensors``; ``what`` says whose tensors they are."""
    bad = nonfinite_tensors(tensors)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise error(f"{what}: tensor {bad[0]!r}{more} holds NaN or inf")


# -- seeding ---------------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. ``(seed, step, rank)``; nearby keys give unrelated seeds."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & (2**63 - 1)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by `derive_seed` of ``keys``.

    Drawing on the CPU and moving the result makes the numbers identical on every device.
    """
    return torch.Generator().manual_seed(derive_seed(*keys))


# -- optimizer and schedule ------------------------------------------------------------------------


def weight_decay_groups(
    model: nn.Module, weight_decay: float, no_decay_names: Iterable[str] = NO_DECAY_NAMES
) -> list[dict]:
    """Two AdamW parameter groups: with decay, and without it for biases, norms, tokens and position embeddings.

    Frozen parameters (e.g. fixed sin-cos position embeddings) are left out.
    """
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or any(token in name for token in no_decay_names):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    device: torch.device | None = None,
) -> torch.optim.AdamW:
    """AdamW with `weight_decay_groups`; the fused kernel on CUDA."""
    fused = device is not None and torch.device(device).type == "cuda"
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup from 0, then half a cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps  # the first update already uses a non-zero lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine` as a scheduler stepped once per optimizer update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    )


# -- checkpoints -----------------------------------------------------------------------------------


def checkpoint_settings(checkpoint: str | Path) -> dict | None:
    """The run settings a checkpoint was saved with (``training_state.json``'s ``settings``), None if not recorded."""
    try:
        return json.loads((Path(checkpoint) / TRAINING_STATE_NAME).read_text()).get("settings")
    except (OSError, ValueError):
        return None  # load_checkpoint names what is wrong with the file


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint folder name, or None for anything else (partial saves, files)."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first. Partial saves are never listed."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def save_checkpoint(
    accelerator, checkpoints_dir: str | Path, step: int, training_state: dict, total_limit: int | None = None
) -> Path:
    """Save the full training state atomically; call on every process. Returns the checkpoint folder.

    Every process writes its part with ``accelerator.save_state`` (weights as safetensors, optimizer,
    schedulers, scaler, per-process RNG states) into a partial folder; the main process then adds
    ``training_state`` as JSON, renames the folder into place, repoints ``latest`` and keeps the
    newest ``total_limit`` checkpoints.
    """
    checkpoints_dir = Path(checkpoints_dir)
    name = checkpoint_name(step)
    final, partial = checkpoints_dir / name, checkpoints_dir / (PARTIAL_PREFIX + name)
    if accelerator.is_main_process:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left over from a save that was killed
    accelerator.wait_for_everyone()

    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        if accelerator.is_main_process:
            (partial / TRAINING_STATE_NAME).write_text(json.dumps({"step": step, **training_state}, indent=1) + "\n")
    except OSError as error:
        raise _failed_save(error, partial, final, checkpoints_dir) from error
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        if final.exists():  # re-saving a step, e.g. after resuming from an older checkpoint
            stale = checkpoints_dir / (PARTIAL_PREFIX + "stale-" + name)
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        with atomic_path(checkpoints_dir / LATEST_NAME) as latest:
            latest.write_text(name + "\n")
        if total_limit is not None and total_limit > 0:
            for old in complete_checkpoints(checkpoints_dir)[:-total_limit]:
                if old != final:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _failed_save(error: OSError, partial: Path, final: Path, checkpoints_dir: Path) -> OSError:
    """Remove the partial folder of a failed save and say what is left: ``latest`` was not touched."""
    shutil.rmtree(partial, ignore_errors=True)
    pointer = checkpoints_dir / LATEST_NAME
    kept = f"{pointer} still names {pointer.read_text().strip()}" if pointer.is_file() else "no earlier checkpoint exists"
    cause = "no space left on device" if error.errno == errno.ENOSPC else f"{type(error).__name__}: {error}"
    message = (
        f"{cause} while saving checkpoint {final} (written to {partial}, now removed; {kept}). "
        f"Free space in {checkpoints_dir} and resume with --resume-from-checkpoint latest"
    )
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


def resolve_checkpoint(spec: str | Path, checkpoints_dir: str | Path) -> Path:
    """Turn ``--resume-from-checkpoint`` into a complete checkpoint folder.

    ``spec`` is ``"latest"`` (the newest checkpoint in ``checkpoints_dir``), a checkpoints folder
    (its newest checkpoint) or one checkpoint folder.

    Raises:
        CheckpointError: nothing to resume from, naming the folder that was searched.
    """
    if str(spec) == LATEST_NAME:
        return latest_checkpoint(checkpoints_dir)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if checkpoint_step(path) is not None or (path / TRAINING_STATE_NAME).is_file():
        return path
    if path.name.startswith(PARTIAL_PREFIX):
        raise CheckpointError(f"{path} is an incomplete checkpoint (its save was interrupted); resume from 'latest'")
    return latest_checkpoint(path)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path:
    """The checkpoint ``latest`` points to; the newest complete one if that pointer is missing or stale."""
    checkpoints_dir = Path(checkpoints_dir)
    pointer = checkpoints_dir / LATEST_NAME
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not name.startswith(CHECKPOINT_PREFIX):
            raise CheckpointError(f"{pointer} names {name!r}, not a {CHECKPOINT_PREFIX}<step> checkpoint of this run")
        try:  # a hand-edited pointer must not resume another run's checkpoint
            target = child_path(checkpoints_dir, name, f"the checkpoint named by {pointer}")
        except ValueError as error:
            raise CheckpointError(str(error)) from error
        if target.is_dir():
            return target
    complete = complete_checkpoints(checkpoints_dir)
    if not complete:
        raise CheckpointError(
            f"no checkpoint found in {checkpoints_dir} (looked for {CHECKPOINT_PREFIX}<step> folders)"
        )
    return complete[-1]


def load_checkpoint(accelerator, checkpoint: str | Path) -> dict:
    """Restore everything `save_checkpoint` saved into the prepared objects; returns the training state.

    Raises:
        CheckpointError: missing or unreadable files, naming the checkpoint and the cause.
    """
    checkpoint = Path(checkpoint)
    expected = [
        "model.safetensors",
        "optimizer.bin",
        f"random_states_{accelerator.process_index}.pkl",
        TRAINING_STATE_NAME,
    ]
    missing = [name for name in expected if not (checkpoint / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{checkpoint} is not a complete checkpoint (missing {', '.join(missing)}); "
            "it may come from another number of processes or a different program"
        )
    try:
        training_state = json.loads((checkpoint / TRAINING_STATE_NAME).read_text())
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # safetensors, pickle and torch raise many types for damaged files
        raise CheckpointError(f"cannot load checkpoint {checkpoint}: {type(error).__name__}: {error}") from error
    # a flipped bit that yields NaN loads without complaint; training on would only blame the learning rate
    for index, model in enumerate(accelerator._models):
        weights = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
        require_finite(weights, f"checkpoint {checkpoint} (model {index}) is damaged", CheckpointError)
    for index, optimizer in enumerate(accelerator._optimizers):
        moments = {f"param {p}.{key}": value for p, state in optimizer.state_dict()["state"].items()
                   for key, value in state.items() if isinstance(value, torch.Tensor)}  # fmt: skip
        require_finite(moments, f"checkpoint {checkpoint} (optimizer {index}) is damaged", CheckpointError)
    return training_state


# -- metrics ---------------------------------------------------------------------------------------


class ThroughputMeter:
    """Samples per second over a sliding window of recent steps (the first step, often slow, drops out)."""

    def __init__(self, window: int = 20):
        self.events: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def update(self, samples: int) -> None:
        self.events.append((time.perf_counter(), samples))

    @property
    def rate(self) -> float:
        if len(self.events) < 2:
            return float("nan")
        elapsed = self.events[-1][0] - self.events[0][0]
        samples = sum(n for _, n in list(self.events)[1:])  # samples finished after the first timestamp
        return samples / elapsed if elapsed > 0 else float("nan")


def loss_summary(losses: list[float], window: int = 10) -> dict[str, float]:
    """First and last loss plus means over the first/last ``window`` steps (less noisy for short runs)."""
    if not losses:
        raise ValueError("no losses recorded")
    window = max(1, min(window, len(losses) // 2 or 1))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    return {
        "first_loss": float(losses[0]),
        "last_loss": float(losses[-1]),
        "first_mean": first,
        "last_mean": last,
        "window": window,
        "relative_change": (last - first) / first if first else float("nan"),
    }


# -- run metadata ----------------------------------------------------------------------------------


def hardware_summary(accelerator) -> str:
    """E.g. ``"2 x NVIDIA H100 80GB HBM3"`` or ``"2 processes on CPU (x86_64, 16 cores)"``."""
    device = accelerator.device
    if device.type == "cuda":
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(device)}"
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    return f"{processes} on {device.type.upper()} ({platform.machine()}, {os.cpu_count()} cores)"


def jsonable(value: Any) -> Any:
    """``value`` with paths and other objects turned into strings, for JSON files and tracker configs."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


__all__ = [
    "CheckpointError",
    "nonfinite_tensors",
    "require_finite",
    "checkpoint_settings",
    "derive_seed",
    "seeded_generator",
    "weight_decay_groups",
    "make_adamw",
    "warmup_cosine",
    "warmup_cosine_schedule",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "latest_checkpoint",
    "complete_checkpoints",
    "ThroughputMeter",
    "loss_summary",
    "hardware_summary",
    "jsonable",
]
