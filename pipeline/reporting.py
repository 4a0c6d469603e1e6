"""Training numbers streamed as they are made, as TRL's `report_to` does: `train.report_to` and
`finetune.report_to` list the backends ("tensorboard"; the `tracking` extra installs it). Both stages log the
same names: `train/loss`, `train/lr`, `val/loss`, `val/accuracy`, and `val/accuracy/<module>`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import ModrmError

BACKENDS = ("tensorboard",)


class Reporter:
    """Scalars to every chosen backend; with none, a no-op."""

    def __init__(self, backends: Sequence[str], log_dir: Path):
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise ModrmError(f"report_to: unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS)})")
        self.writer = None
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ModrmError(
                    "report_to tensorboard needs the tensorboard package: pip install 'modrm[tracking]'"
                ) from None
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def log_validation(self, val: dict, step: int) -> None:
        modules = {f"val/accuracy/{name}": m["accuracy"] for name, m in val["modules"].items()}
        self.log({"val/loss": val["loss"], "val/accuracy": val["accuracy"], **modules}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
