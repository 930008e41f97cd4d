"""What a checkpoint holds: what training changes (trainable parameters, optimizer, loop and data position, RNG), not
the frozen weights, which come back from the pretrained models and init_from; and resuming from it is exact."""
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import FAST, compose_cfg
from uae_lightning.pipeline import UAEPipeline
from uae_lightning.runner import run_pipeline

U4G = ["run=[u4g]", *FAST, "stages.u4g.data.batch_size=2", "stages.u4g.module.group_size=2",
       "stages.u4g.module.num_steps=4", "stages.u4g.module.train_window=[0,2]", "stages.u4g.module.eval_steps=2",
       "trainer.checkpoint_every_n_steps=2"]


def test_lora_stage_checkpoint_holds_only_the_adapter_and_resumes_exactly(tmp_path):
    """U4G (LoRA on the DiT, everything else frozen), 2 steps, then resumed to 4, against 4 straight steps. The
    checkpoint's state dict is exactly the adapter; with AdamW's two moments its size is 3 x the adapter's float32
    bytes plus loop/RNG/data state and torch's per-tensor record overhead (~0.4 KB per tensor: 4% of the toy's 8 KB
    LoRA matrices, nothing at paper scale): within 10% (measured: 1.057x). A checkpoint still holding the frozen DiT would be
    ~20x larger; a resume that lost the optimizer moments, the RNG or the data position gives other weights."""
    run_pipeline(compose_cfg([*U4G, "stages.u4g.trainer.max_steps=2"]), tmp_path / "resumed")
    stage = tmp_path / "resumed" / "u4g"
    ckpt = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    keys = set(ckpt["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    adapter_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values())
    size = (stage / "checkpoints" / "last.ckpt").stat().st_size
    assert 3 * adapter_bytes <= size <= 1.10 * 3 * adapter_bytes, (size, adapter_bytes)
    cfg = compose_cfg(U4G)
    pipe = UAEPipeline.from_weights(stage / "weights.safetensors", OmegaConf.to_container(cfg.model, resolve=True), 32)
    assert size < sum(v.numel() * v.element_size() for v in pipe.state_dict().values()) / 5  # the whole auto-encoder
    # Simulate a job killed after its step-2 checkpoint, then run on to step 4.
    (stage / "done.json").unlink()
    (stage / "weights.safetensors").unlink()
    resumed = run_pipeline(compose_cfg([*U4G, "stages.u4g.trainer.max_steps=4"]), tmp_path / "resumed")
    straight = run_pipeline(compose_cfg([*U4G, "stages.u4g.trainer.max_steps=4"]), tmp_path / "straight")
    a = load_file(stage / "weights.safetensors")
    b = load_file(tmp_path / "straight" / "u4g" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["stages"] == straight["stages"]
    # The resumed run trained: its DiT differs from the one after 2 steps.
    ckpt4 = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt4["global_step"] == 4
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt4["state_dict"][k]) for k in keys)
