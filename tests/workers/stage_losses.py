"""Run toy stages through the real CLI code path and record, per rank and stage, the loss the trainer reports each
step and a probe of the random stream the stage trains with (three uniform draws at its first batch, taken without
consuming the stream).

    python tests/workers/stage_losses.py OUT_DIR [hydra overrides...]

Lightning re-launches this script for ranks > 0 (strategy fsdp2, trainer.devices=N); each rank writes
OUT_DIR/<stage>_rank<r>.json, and OUT_DIR/bench_rank<r>.json with the number of images it redrew for Unified-Bench
and whether the run left its process group behind.
"""
import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import compose_cfg  # noqa: E402

import uae_lightning.runner as runner  # noqa: E402


class RecordLoss(L.Callback):
    def __init__(self, out: Path):
        self.out, self.losses, self.probe, self.tested = out, [], None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.probe is None:
            with torch.random.fork_rng(devices=[]):
                self.probe = torch.rand(3).tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))

    def on_test_start(self, trainer, pl_module):
        self.tested = 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.tested += int(batch["weight"].sum())

    def on_train_end(self, trainer, pl_module):
        self.write(trainer)

    def on_test_end(self, trainer, pl_module):
        self.write(trainer)

    def write(self, trainer):
        path = self.out / f"{Path(trainer.default_root_dir).name}_rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"losses": self.losses, "world_size": trainer.world_size, "probe": self.probe,
                                    "tested": self.tested}))


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    build = runner.build_trainer

    def build_with_recorder(cfg, name, stage_dir):
        trainer = build(cfg, name, stage_dir)
        trainer.callbacks.append(RecordLoss(out))
        return trainer

    runner.build_trainer = build_with_recorder
    from lightning.pytorch.utilities import rank_zero_only

    from uae_lightning.pipeline import UAEPipeline

    redrawn = []
    reconstruct = UAEPipeline.reconstruct

    def counted(self, images, *args, **kwargs):
        redrawn.append(len(images))
        return reconstruct(self, images, *args, **kwargs)

    UAEPipeline.reconstruct = counted
    runner.run_pipeline(compose_cfg(overrides), out / "run")
    (out / f"bench_rank{rank_zero_only.rank}.json").write_text(json.dumps({
        "images": sum(redrawn), "group_left": torch.distributed.is_initialized()}))


if __name__ == "__main__":
    main()
