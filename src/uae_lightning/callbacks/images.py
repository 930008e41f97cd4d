"""TensorBoard previews: a fixed held-out batch, originals next to reconstructions, with their captions."""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid


class ImagePreview(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of training), log `pl_module.preview(batch)`:
    a grid whose rows are original | reconstruction(s), and the captions as text."""

    def __init__(self, every_n_steps: int = 200, num_images: int = 8):
        super().__init__()
        self.every_n_steps, self.num_images = every_n_steps, num_images
        self._batch: dict | None = None

    def _fixed_batch(self, trainer: L.Trainer) -> dict | None:
        if self._batch is None:
            dm = trainer.datamodule
            for batch in dm.val_dataloader():
                if "images" in batch:
                    self._batch = {k: v[: self.num_images] for k, v in batch.items() if k != "skipped"}
                    break
        return self._batch

    @torch.no_grad()
    def log_preview(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        batch = self._fixed_batch(trainer)
        if not loggers or batch is None:
            return
        # Every rank computes the preview (with sharded models, drawing is a collective); rank 0 logs it.
        batch = {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():  # the stage's compute precision (autocast under bf16-mixed)
            out = pl_module.preview(batch)
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        originals = batch["images"]
        recon = out["reconstructions"]  # [N,3,H,W] or [N,G,3,H,W]
        if recon.dim() == 4:
            recon = recon[:, None]
        rows = torch.cat([originals[:, None], recon.to(originals.device)], 1)  # [N, 1+G, 3, H, W]
        grid = make_grid(rows.flatten(0, 1).float().cpu(), nrow=rows.shape[1], padding=1, pad_value=1.0)
        # The step axis of the scalars (Lightning logs them per training batch: a rollout batch in the RL stages,
        # which make several optimizer steps per batch), so that a preview lines up with the curves.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        exp = loggers[0].experiment
        exp.add_image("preview/original|reconstructions", grid, step)
        text = "\n\n".join(f"{i}. {c}" for i, c in enumerate(out["captions"]))
        exp.add_text("preview/captions", text, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.log_preview(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_preview(trainer, pl_module)
