import torch

from uae_lightning.data import toy
from uae_lightning.data.tokenizer import build_toy_processor


def test_every_caption_round_trips_without_unknown_words():
    tok = build_toy_processor(32, 4, 2).tokenizer
    for i in range(100):
        text = toy.caption(toy.make_scene(0, i), "complete")
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_processor_expands_one_image_into_its_merged_patches():
    proc = build_toy_processor(32, 4, 2)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    enc = proc(text=[text, text], images=[img, img], return_tensors="pt", padding=True)
    n_image_tokens = (enc.input_ids == proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(1)
    assert n_image_tokens.tolist() == [(32 // 4 // 2) ** 2] * 2  # 16 merged 8x8-pixel patches per image
    assert enc.image_grid_thw.tolist() == [[1, 8, 8]] * 2
