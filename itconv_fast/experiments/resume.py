"""Resuming a run from its run directory: the checkpoint of its last finished epoch, and the rules for a run that
diverged (restarted only when asked, with a new lr and weight decay on the saved schedule)."""

from __future__ import annotations

import dataclasses
import json
import os

from ..io.checkpoint import CheckpointError, load_checkpoint_state, set_rng_state
from .config import TrainConfig
from .divergence import RESTARTABLE_FIELDS
from .schedule import lr_factor

__all__ = ["RunDivergedError", "previous_divergence", "resume_run"]


class RunDivergedError(ValueError):
    """--resume of a run whose training diverged, without --restart-diverged."""


def previous_divergence(out_dir: str):
    """The divergence record of a run directory whose metrics.json says `status: diverged`, else None."""
    try:
        with open(os.path.join(out_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(metrics, dict) and metrics.get("status") == "diverged":
        record = metrics.get("divergence")
        return dict(record) if isinstance(record, dict) else {}
    return None


def resume_run(
    out_dir,
    config,
    device,
    model,
    optimizer,
    scheduler,
    generator,
    metrics,
    *,
    restart_diverged,
    lr,
    total_steps,
    warmup,
) -> int:
    """Restores a run from out_dir/checkpoint.pt into the model, optimizer, schedule, RNG and metrics; returns the
    epoch to start from (0 without a checkpoint). A diverged run is restarted only with restart_diverged, and then
    with the new lr and weight decay on the saved schedule; any other change of configuration is refused."""
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    start_epoch = 0
    diverged = previous_divergence(out_dir)
    if diverged is not None:
        if not restart_diverged:
            kept = (
                f"its last good checkpoint (epoch {diverged.get('epoch', 1) - 1}) is kept: restart from it"
                if os.path.exists(ckpt_path)
                else "no epoch had finished: start it again"
            )
            rule = diverged.get("rule") or f"non-finite {diverged.get('what', 'values')}"
            raise RunDivergedError(
                f"{out_dir} diverged ({rule} at epoch "
                f"{diverged.get('epoch')}, step {diverged.get('step')}, lr {diverged.get('lr')}); "
                f"{kept} with --restart-diverged (e.g. with a lower --lr)"
            )
        metrics["restarts"] = [{"diverged": diverged, "lr": config.lr, "weight_decay": config.weight_decay}]
    if os.path.exists(ckpt_path):
        state = load_checkpoint_state(
            ckpt_path,
            map_location=device,
            required=("model", "optimizer", "scheduler", "rng", "epoch", "epochs", "config"),
        )
        saved = {**dataclasses.asdict(TrainConfig()), **state["config"]}  # fields added since take their defaults
        # compile may differ (same computation to float tolerance; an old run saved true/false, the default is auto)
        may_change = ("compile",) + (RESTARTABLE_FIELDS if diverged is not None else ())
        changed = sorted(k for k in saved if saved[k] != dataclasses.asdict(config).get(k) and k not in may_change)
        if changed:
            raise ValueError(f"cannot resume {out_dir}: its configuration differs in {changed}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if diverged is not None:  # the restart's lr and weight decay replace the saved ones, on the same schedule
            scheduler.base_lrs = [lr for _ in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(scheduler.last_epoch, total_steps, warmup)
                group["weight_decay"] = config.weight_decay
            metrics["restarts"] = list(state.get("restarts", [])) + metrics["restarts"]
        try:
            set_rng_state(state["rng"], generator)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt_path}: its RNG state is not readable ({exc})") from None
        metrics["epochs"] = state["epochs"]
        start_epoch = state["epoch"] + 1
        metrics["resumed_at_epochs"] = list(state.get("resumed_at_epochs", [])) + [start_epoch]
    return start_epoch
