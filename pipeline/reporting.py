"""Training numbers streamed as they are made, as TRL's `report_to` does: `train.report_to` and
`finetune.report_to` list the backends, "tensorboard" and "wandb" (the `tracking` extra installs both). Both
stages log the same names: `train/loss`, `train/lr`, `val/loss`, `val/accuracy`, and `val/accuracy/<module>`.

tensorboard writes event files to `<out>/runs`. wandb starts one run per stage, named after the output folder,
with the resolved config; it reads its usual environment (WANDB_PROJECT, default "modrm"; WANDB_ENTITY;
WANDB_MODE=offline on a machine without network) and keeps its files under `<out>/runs`. Stage 1 writes there as
it trains; stage 0, which writes nothing into `<out>` before its checkpoint, logs to a temporary folder that joins
the checkpoint in the same commit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.atomic import refuse_link
from pipeline.errors import ModrmError

BACKENDS = ("tensorboard", "wandb")
RUNS_DIR = "runs"  # the logs' folder in a checkpoint


class Reporter:
    """Scalars to every chosen backend; with none, a no-op."""

    def __init__(self, backends: Sequence[str], log_dir: Path, run_name: str = "", config: dict | None = None):
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise ModrmError(f"report_to: unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
        self.writer = self.run = None
        for planted in (log_dir, log_dir / "wandb") if backends else ():  # the loggers write through links
            refuse_link(planted)
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ModrmError(
                    "report_to tensorboard needs the tensorboard package: pip install 'modrm[tracking]'"
                ) from None
            self.writer = SummaryWriter(log_dir=str(log_dir))
        if "wandb" in backends:
            try:
                import wandb
            except ImportError:
                raise ModrmError("report_to wandb needs the wandb package: pip install 'modrm[tracking]'") from None
            log_dir.mkdir(parents=True, exist_ok=True)
            project = os.environ.get("WANDB_PROJECT", "modrm")
            self.run = wandb.init(project=project, name=run_name or None, dir=str(log_dir), config=config or {})

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.run is not None:
            self.run.log(values, step=step)

    def log_validation(self, val: dict, step: int) -> None:
        modules = {f"val/accuracy/{name}": m["accuracy"] for name, m in val["modules"].items()}
        self.log({"val/loss": val["loss"], "val/accuracy": val["accuracy"], **modules}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
