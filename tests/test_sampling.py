"""Sampling = scoring: G4U's policy log-probs are those of the distribution `generate` sampled from, whatever the
checkpoint's generation_config.json says (Qwen2.5-VL-3B-Instruct ships repetition_penalty 1.05, top_k 1, top_p 0.001,
temperature 0.1 and two EOS ids)."""
import torch
from omegaconf import OmegaConf
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import compose_cfg
from uae_lightning.data.tokenizer import build_toy_processor
from uae_lightning.models.build import build_encoder, toy_encoder_config


def save_encoder_with_generation_config(path, tiny: dict) -> None:
    """A tiny Qwen2.5-VL saved like the hub checkpoint, whose generation_config.json carries the Instruct model's
    near-greedy settings and a second EOS id (the pad token, as <|endoftext|> is in Qwen's vocabulary)."""
    processor = build_toy_processor(32, tiny["patch_size"], tiny["merge_size"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(toy_encoder_config(tiny, processor.tokenizer))
    tok = processor.tokenizer
    g = model.generation_config
    g.do_sample, g.repetition_penalty, g.temperature, g.top_k, g.top_p = True, 1.05, 0.1, 1, 0.001
    g.eos_token_id, g.pad_token_id = [tok.eos_token_id, tok.pad_token_id], tok.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)


def test_stored_logprobs_are_the_sampled_distribution_despite_the_checkpoint_generation_config(tmp_path):
    m = OmegaConf.to_container(compose_cfg().model, resolve=True)
    save_encoder_with_generation_config(tmp_path, m["encoder"]["tiny"])
    enc = build_encoder({**m["encoder"], "pretrained": str(tmp_path)}, 32, "mask")
    assert enc.eos_ids == sorted({enc.tokenizer.eos_token_id, enc.tokenizer.pad_token_id})  # both stop a caption

    scores = []
    generate = enc.model.generate

    def generate_and_keep_scores(**kwargs):
        out = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))  # [N, T, V]: the processed logits each token was sampled from
        return out.sequences

    enc.model.generate = generate_and_keep_scores
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32).repeat(8, 1, 1, 1)  # one image, a G4U group of 8
    caps = enc.caption(images, do_sample=True, temperature=0.7, max_new_tokens=24)
    # top_k 1 inherited from the checkpoint would make every sample the same caption.
    assert len(set(caps.texts)) > 1
    completion = caps.sequences[:, caps.prompt_length:]
    sampled = torch.gather(scores[0].float().log_softmax(-1), 2, completion.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        scored = enc.completion_logprobs(caps, temperature=0.7)
    mask = caps.completion_mask
    assert mask.sum() > 8
    # A repetition penalty of 1.05 in sampling (and not in scoring) moves these by up to ~0.2.
    assert (sampled - scored)[mask].abs().max() < 1e-5
