"""One rank of a real process group reading one training pass through the DataModule, as a stage does: writes the
keys of the samples it got, batch by batch, and the skip counters.

    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python tests/workers/read_epoch.py SETTINGS_JSON OUT_JSON
"""
import json
import sys
from collections import Counter

import torch.distributed as dist

from uae_lightning.data.datamodule import UAEDataModule


def main() -> None:
    settings, out = json.loads(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    dm = UAEDataModule(**settings)
    dm.setup()
    batches, counts = [], Counter()
    for batch in dm.train_dataloader():
        batches.append(batch.get("key", []))
        counts.update(batch["skipped"])
    dist.barrier()
    with open(out, "w") as f:
        json.dump({"batches": batches, "skipped": counts, "rank": dist.get_rank()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
