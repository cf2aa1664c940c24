"""The train stage's Trainer callbacks: extra checkpoints, logging windows that start at a
checkpoint, dropout per rank, and dvclive. Apart from stages/train.py so that the process that only
launches the training processes does not import the Trainer (3 s of imports)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback


def _live_name(key: str) -> str | None:
    """Trainer log key → dvclive metric name; what a rerun would not reproduce is dropped.

    Timings vary from run to run, and the Trainer's closing `train_loss` averages only the steps of
    the last session: a run resumed from a checkpoint reports another value (0.0 when the checkpoint
    had finished), though it trains the same model. The per-step `train/loss` curve stays.
    """
    if "runtime" in key or "per_second" in key:
        return None
    if key in ("epoch", "total_flos", "step", "train_loss"):
        return None
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    return f"train/{key}"


def log_to_live(live, logs: dict[str, Any], step: int) -> None:
    """Log one Trainer log entry at `step` (the optimizer step, so resumed runs line up)."""
    live.step = step
    # Sorted: checkpoints store the log history with sorted keys, and a resumed run replays it, so
    # the summary's key order must not depend on whether the run was interrupted.
    for key, value in sorted(logs.items()):
        name = _live_name(key)
        if name is not None and isinstance(value, int | float):
            live.log_metric(name, float(value))
    live.make_summary()


def derived_seed(*values: int) -> int:
    """A 32-bit seed that depends on every value (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1)[0])


class MidEpochCheckpoints(TrainerCallback):
    """Save every `checkpoint_steps` too, so a kill mid-epoch loses at most that many steps.

    Saving stays per-epoch in TrainingArguments because best-model selection needs save and eval
    strategies to match; these extra checkpoints carry no metric and are rotated away.
    """

    def __init__(self, checkpoint_steps: int) -> None:
        self.checkpoint_steps = checkpoint_steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.checkpoint_steps == 0:
            control.should_save = True


class OwnDropoutPerRank(TrainerCallback):
    """Under DDP: one shuffle for all ranks, but each rank its own dropout masks.

    Every rank starts from the same seed, so without this two ranks apply the same dropout masks
    to their halves of the global batch, where one process draws independent masks for all its
    rows. Each step reseeds each rank from (seed, step, rank); each epoch starts all ranks from one
    state of (seed, epoch), from which the length-grouped sampler draws that epoch's shuffle, so
    the ranks still split one permutation. One process: no-op.
    """

    def on_epoch_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(derived_seed(args.seed, 0, round(state.epoch or 0)))

    def on_step_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(derived_seed(args.seed, 1, state.global_step, args.process_index))


class LogAtEverySave(TrainerCallback):
    """Close the loss-logging window at every checkpoint.

    The Trainer logs the mean training loss since its last log and does not checkpoint the sum it
    is averaging, so a run resumed inside a window would log another mean at that window's end.
    Logging at each save makes every window start at a checkpoint: a resumed run logs what an
    uninterrupted one does.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True


class LiveLogger(TrainerCallback):
    """Each Trainer log entry to dvclive, on rank 0, at its optimizer step."""

    def __init__(self, live) -> None:
        self.live = live

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.live is not None and state.is_world_process_zero and logs:
            log_to_live(self.live, logs, state.global_step)


def callbacks(live, checkpoint_steps: int) -> list[TrainerCallback]:
    """The stage's callbacks, in the order they must run (a save is decided before it is logged)."""
    return [
        MidEpochCheckpoints(checkpoint_steps),
        LogAtEverySave(),
        OwnDropoutPerRank(),
        LiveLogger(live),
    ]
