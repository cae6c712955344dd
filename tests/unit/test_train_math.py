"""Training data preparation and the plain-tensor math of ED-LoRA tuning."""

from __future__ import annotations

import math

import comfy.model_sampling
import pytest
import torch
from PIL import Image

from mixofshow.edlora.format import EDLoRAError
from mixofshow.training.data import expand_captions, parse_concept_words, prepare_images, read_image_folder, square_crop
from mixofshow.training.loop import init_embeddings, init_lora_pair
from mixofshow.training.losses import attention_regularisation, diffusion_target, latent_masks, masked_mse, mean_embedding_norm

# ------------------------------------------------------------------------------------------------ data


def test_concept_words_parse_and_refuse_by_name():
    assert parse_concept_words("<potter1>+<potter2>") == ["<potter1>", "<potter2>"]
    assert parse_concept_words(" <cat> ") == ["<cat>"]
    with pytest.raises(EDLoRAError, match="'potter2'"):
        parse_concept_words("<potter1>+potter2")
    with pytest.raises(EDLoRAError, match="twice"):
        parse_concept_words("<a>+<a>")
    with pytest.raises(EDLoRAError, match="<TOK>"):
        parse_concept_words("<TOK>")
    with pytest.raises(EDLoRAError, match="joined by"):
        parse_concept_words("<a>++<b>")


def test_square_crop_keeps_the_centre_of_the_long_side():
    image = torch.zeros(100, 300, 3)
    image[:, 100:200] = 1.0  # the middle third is white
    out = square_crop(image, 64)
    assert out.shape == (64, 64, 3)
    assert out.min() > 0.9 and out[:, 2:-2].min() > 0.99  # only the centre square is left (edges: filter blur)
    tall = torch.zeros(300, 100, 3)
    tall[:100] = 1.0  # top third white: cut away by a centre crop
    assert square_crop(tall, 64)[2:].max() < 0.01


def test_prepare_images_mixed_sizes_and_masks():
    images = [torch.rand(80, 120, 3), torch.rand(200, 100, 3), torch.rand(64, 64, 3)]
    with pytest.raises(EDLoRAError, match=r"Training image 'a.png' is 120x80, smaller than the training resolution 128"):
        prepare_images(images, None, 128, names=["'a.png'", "'b.png'", "'c.png'"])
    with pytest.raises(EDLoRAError, match=r"Training image 2 is 64x64, smaller than the training resolution 128"):
        prepare_images([torch.rand(200, 130, 3)] * 2 + images[2:], None, 128)
    masks = [torch.ones(80, 120), torch.zeros(200, 100), torch.ones(64, 64)]
    masks[1][90:110, 40:60] = 1.0
    out, out_masks = prepare_images(images, masks, 64)
    assert out.shape == (3, 64, 64, 3) and out_masks.shape == (3, 64, 64)
    assert 0.0 < float(out_masks[1].mean()) < 0.2
    with pytest.raises(EDLoRAError, match="Mask 1 is empty"):
        prepare_images(images, [masks[0], torch.zeros(200, 100), masks[2]], 64)
    with pytest.raises(EDLoRAError, match=r"Mask 0 is \(10, 10\) but image 0 is \(80, 120\)"):
        prepare_images(images, [torch.ones(10, 10), masks[1], masks[2]], 64)
    with pytest.raises(EDLoRAError, match="2 masks were given for 3 images"):
        prepare_images(images, masks[:2], 64)
    with pytest.raises(EDLoRAError, match="multiple of 8"):
        prepare_images(images, None, 100)


def test_captions_template_and_tok_replacement():
    concept = "<p1> <p2>"
    assert expand_captions("", 2, concept) == ["a photo of <p1> <p2>"] * 2
    got = expand_captions("<TOK> on a beach\n\nsitting on a chair", 3, concept, "a portrait of <TOK>")
    assert got == ["<p1> <p2> on a beach", "a portrait of <p1> <p2>", "a portrait of <p1> <p2>, sitting on a chair"]
    assert expand_captions("<TOK> one\n\n", 3, concept)[1:] == ["a photo of <p1> <p2>"] * 2  # empty lines count
    assert expand_captions("<TOK> one\n<TOK> two\n\n", 2, concept) == ["<p1> <p2> one", "<p1> <p2> two"]
    with pytest.raises(EDLoRAError, match="2 lines for 3 images"):
        expand_captions("a\nb", 3, concept)
    with pytest.raises(EDLoRAError, match="must contain <TOK>"):
        expand_captions("", 1, concept, "a photo")


def _save(path, size, color):
    Image.new("RGB", size, color).save(path)


def test_read_image_folder_both_layouts(tmp_path):
    original = tmp_path / "potter"
    for sub in ("image", "mask", "caption"):
        (original / sub).mkdir(parents=True)
    _save(original / "image" / "b.jpg", (120, 80), "red")
    _save(original / "image" / "a.png", (64, 96), "blue")
    Image.new("L", (120, 80), 255).save(original / "mask" / "b.png")
    Image.new("L", (64, 96), 255).save(original / "mask" / "a.png")
    (original / "caption" / "a.txt").write_text("<TOK> in a robe\nsecond line ignored\n")
    names, images, masks, captions = read_image_folder(str(original))
    assert names == ["a.png", "b.jpg"]
    assert [tuple(i.shape) for i in images] == [(96, 64, 3), (80, 120, 3)]
    assert [tuple(m.shape) for m in masks] == [(96, 64), (80, 120)]
    assert captions == ["<TOK> in a robe", ""]
    assert float(images[0][..., 2].mean()) > 0.99  # blue

    flat = tmp_path / "flat"
    flat.mkdir()
    _save(flat / "x.png", (70, 70), "white")
    (flat / "x.txt").write_text("a <TOK>")
    names, images, masks, captions = read_image_folder(str(flat))
    assert names == ["x.png"] and masks is None and captions == ["a <TOK>"]

    (original / "mask" / "a.png").unlink()
    with pytest.raises(EDLoRAError, match="masks for 1 of 2 images"):
        read_image_folder(str(original))
    with pytest.raises(EDLoRAError, match="does not exist"):
        read_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EDLoRAError, match="has no images"):
        read_image_folder(str(tmp_path / "empty"))
    (flat / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EDLoRAError, match="broken.png"):
        read_image_folder(str(flat))


# ------------------------------------------------------------------------------------------------ math


def test_lora_init_matches_the_original():
    generator = torch.Generator().manual_seed(0)
    pair = init_lora_pair(out_features=40, in_features=100, rank=4, generator=generator)
    assert pair.down.shape == (4, 100) and pair.up.shape == (40, 4)
    assert torch.count_nonzero(pair.up) == 0  # the adapter starts as the identity
    bound = 1 / math.sqrt(100)
    assert float(pair.down.abs().max()) <= bound and float(pair.down.abs().max()) > 0.9 * bound


def test_embedding_init_class_word_and_random():
    generator = torch.Generator().manual_seed(0)
    class_vector = torch.arange(8.0)
    out = init_embeddings(["<a>", "<b>"], class_vector, layers=16, width=8, generator=generator)
    assert list(out) == ["<a>", "<b>"]
    assert out["<b>"].shape == (16, 8) and torch.equal(out["<b>"], class_vector.repeat(16, 1))
    assert torch.equal(out["<a>"], out["<a>"][0].repeat(16, 1))  # one start vector copied to every layer
    big = init_embeddings(["<a>"] * 1, None, layers=1, width=100_000, generator=generator)["<a>"]
    assert abs(float(big.std()) - 0.017) < 0.001
    mixed = init_embeddings(["<a>", "<b>"], torch.zeros(100_000), layers=1, width=100_000, generator=generator)
    assert abs(float(mixed["<a>"].std()) - 0.013) < 0.001


def test_masked_mse_is_the_mean_over_the_mask():
    prediction = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[:, :, :2] = 2.0  # top half wrong by 2, bottom half right
    mask_top = torch.zeros(2, 1, 4, 4)
    mask_top[:, :, :2] = 1.0
    assert float(masked_mse(prediction, target, None)) == pytest.approx(2.0)
    assert float(masked_mse(prediction, target, mask_top)) == pytest.approx(4.0)
    assert float(masked_mse(prediction, target, 1 - mask_top)) == pytest.approx(0.0)
    soft = torch.full((2, 1, 4, 4), 0.5)
    assert float(masked_mse(prediction, target, soft)) == pytest.approx(2.0)


def test_latent_masks_average_down():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1.0
    small = latent_masks(mask, (2, 2))
    assert small.flatten().tolist() == [1.0, 1.0, 0.0, 0.0]


def test_attention_regularisation_penalises_attention_outside_the_mask():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 1.0  # subject on the left half
    inside = torch.zeros(1, 16, 2)
    inside.view(1, 4, 4, 2)[:, :, :2] = 1.0  # both words attend to the left half only
    outside = torch.zeros(1, 16, 2)
    outside.view(1, 4, 4, 2)[:, :, 2:] = 0.5  # both attend to the right half only (normalised to 1)
    assert float(attention_regularisation([(inside, (4, 4))], mask)) == pytest.approx(0.0)
    assert float(attention_regularisation([(outside, (4, 4))], mask)) == pytest.approx(2.0)  # 2 words x mean 1 outside
    # layers of one resolution are averaged; resolutions add up
    both = attention_regularisation([(inside, (4, 4)), (outside, (4, 4))], mask)
    assert float(both) == pytest.approx(1.0)  # mean map is 0.5 inside, 0.25 outside; by its max: 0.5 outside, per word
    coarse = torch.ones(1, 4, 2)
    assert float(attention_regularisation([(outside, (4, 4)), (coarse, (2, 2))], mask)) == pytest.approx(4.0)
    # a mask that covers everything gives nothing (the original skips the NaN)
    assert float(attention_regularisation([(outside, (4, 4))], torch.ones(1, 1, 4, 4))) == 0.0


def test_mean_embedding_norm():
    vectors = {"<a>": torch.tensor([[3.0, 4.0], [0.0, 1.0]]), "<b>": torch.tensor([[0.0, 2.0], [0.0, 0.0]])}
    assert mean_embedding_norm(vectors) == pytest.approx((5 + 1 + 2 + 0) / 4)


@pytest.mark.parametrize("kind", [comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION])
def test_diffusion_target_denoises_exactly(kind):
    class Sampling(kind, comfy.model_sampling.ModelSamplingDiscrete):
        pass

    sampling = Sampling()
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    sigma = sampling.sigma(torch.tensor([10.0, 500.0, 990.0]))
    x_t = sampling.noise_scaling(sigma, noise, x0)
    target = diffusion_target(sampling, x0, noise, sigma)
    denoised = sampling.calculate_denoised(sigma, target, x_t)
    assert torch.allclose(denoised, x0, atol=1e-4)
    if kind is comfy.model_sampling.EPS:
        assert torch.equal(target, noise)
