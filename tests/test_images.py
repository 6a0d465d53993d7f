"""Image decoding, ADM center crop, [-1, 1] tensors and the ImageFolder-style index."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sfd_scale.data.images import (
    ImageFolderIndex,
    PilDecoder,
    center_crop_arr,
    decode_with_pil,
    hflip,
    load_image_pm1,
    load_rgb,
    select_decoder,
    to_tensor_pm1,
    uint8_to_pm1,
)


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "size_wh, target", [((37, 53), 16), ((101, 67), 32), ((9, 15), 16), ((129, 128), 64), ((5, 5), 7)]
)
def test_center_crop_output_size(size_wh, target):
    out = center_crop_arr(_noise_image(*size_wh), target)
    assert out.size == (target, target)
    assert out.mode == "RGB"


def test_center_crop_box_halving_then_center_crop_by_hand():
    # 2x2 blocks of constant colour: box-halving is exact, so the result is computable by hand.
    # 64x40 -> short side 40 >= 2*20 -> halve to 32x20 -> scale 1 -> crop columns 6..25.
    blocks = np.random.default_rng(1).integers(0, 256, (20, 32, 3), dtype=np.uint8)
    image = Image.fromarray(np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1))
    out = np.asarray(center_crop_arr(image, 20))
    np.testing.assert_array_equal(out, blocks[:, 6:26])


def test_center_crop_halves_only_while_short_side_at_least_twice():
    # Short side 39 < 40: no halving; bicubic to 20x(round(50 * 20/39) = 26), crop columns 3..22.
    image = _noise_image(50, 39, seed=2)
    expected = np.asarray(image.resize((26, 20), resample=Image.BICUBIC))[:, 3:23]
    np.testing.assert_array_equal(np.asarray(center_crop_arr(image, 20)), expected)


def test_center_crop_portrait_crops_rows():
    # 12 wide x 30 tall, target 12: scale 1, rows (30 - 12) // 2 = 9 .. 20.
    image = _noise_image(12, 30, seed=3)
    np.testing.assert_array_equal(np.asarray(center_crop_arr(image, 12)), np.asarray(image)[9:21])


def test_load_rgb_converts_grayscale_and_rgba(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = np.asarray(load_rgb(tmp_path / "g.png"))
    assert rgb.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey)

    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[..., 3] = 7
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_rgb(tmp_path / "a.png")
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), np.broadcast_to([10, 20, 30], (2, 2, 3)))


def test_load_rgb_converts_cmyk(tmp_path):
    cmyk = np.zeros((1, 3, 4), dtype=np.uint8)
    cmyk[0, 1] = [255, 0, 0, 0]  # pure cyan
    cmyk[0, 2] = [0, 0, 0, 255]  # full black
    Image.frombytes("CMYK", (3, 1), cmyk.tobytes()).save(tmp_path / "c.tiff")
    out = load_rgb(tmp_path / "c.tiff")
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out)[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])
    # CMYK JPEGs exist in ImageNet; they must decode to RGB too.
    Image.frombytes("CMYK", (3, 1), cmyk.tobytes()).save(tmp_path / "c.jpg")
    assert load_rgb(tmp_path / "c.jpg").mode == "RGB"


def test_truncated_and_bogus_images_raise_value_error_naming_file(tmp_path):
    path = tmp_path / "broken.jpg"
    _noise_image(64, 64).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="broken.jpg"):
        load_rgb(path)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        load_rgb(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def test_to_tensor_pm1_values_and_layout():
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    arr[0, 0] = [0, 255, 51]
    x = to_tensor_pm1(Image.fromarray(arr))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[0, 0, 0] == -1.0 and x[1, 0, 0] == 1.0
    assert x[2, 0, 0].item() == pytest.approx(51 / 255 * 2 - 1, abs=1e-7)
    assert x[:, 1, 2].tolist() == [-1.0, -1.0, -1.0]


def test_hflip_matches_pil_flip():
    image = _noise_image(7, 5, seed=4)
    expected = to_tensor_pm1(image.transpose(Image.FLIP_LEFT_RIGHT))
    torch.testing.assert_close(hflip(to_tensor_pm1(image)), expected, rtol=0, atol=0)


def test_load_image_pm1_shape_and_range(tmp_path):
    _noise_image(40, 30).save(tmp_path / "x.png")
    x = load_image_pm1(tmp_path / "x.png", 16)
    assert x.shape == (3, 16, 16)
    assert x.min() >= -1 and x.max() <= 1


def test_image_folder_index_sorted_labels_recursive_and_extensions(tmp_path):
    for cls, names in {"zebra": ["b.JPG", "a.png"], "ant": ["sub/c.jpeg", "notes.txt"], "cat": ["d.webp"]}.items():
        for name in names:
            p = tmp_path / cls / name
            p.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".txt"):
                p.write_text("x")
            else:
                _noise_image(4, 4).save(p, format="PNG")
    index = ImageFolderIndex.scan(tmp_path)
    assert index.classes == ("ant", "cat", "zebra")
    assert [(index.relative(p), y) for p, y in index.samples] == [
        ("ant/sub/c.jpeg", 0), ("cat/d.webp", 1), ("zebra/a.png", 2), ("zebra/b.JPG", 2),
    ]
    assert len(index) == 4 and index.class_to_idx["zebra"] == 2


def test_image_folder_index_errors_name_the_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ImageFolderIndex.scan(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no class folders in " + str(tmp_path)):
        ImageFolderIndex.scan(tmp_path)
    (tmp_path / "a").mkdir()
    _noise_image(4, 4).save(tmp_path / "a" / "x.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\['b'\]"):
        ImageFolderIndex.scan(tmp_path)


def test_uint8_batches_convert_exactly_like_single_images():
    images = [_noise_image(5, 4, seed=k) for k in range(3)]
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]))  # (3, 4, 5, 3) uint8
    converted = uint8_to_pm1(batch)
    assert converted.shape == (3, 3, 4, 5)
    for k, image in enumerate(images):
        assert torch.equal(converted[k], to_tensor_pm1(image))


def test_pil_decoder_reports_failures_by_position(tmp_path):
    _noise_image(30, 20, seed=1).save(tmp_path / "a.png")
    Image.fromarray(np.full((25, 40), 90, dtype=np.uint8)).save(tmp_path / "grey.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    paths = [tmp_path / "a.png", tmp_path / "bad.jpg", tmp_path / "grey.jpg", tmp_path / "gone.png"]
    for decoder in (PilDecoder(16), PilDecoder(16, num_workers=2)):
        batch = decoder.decode(paths)
        decoder.close()
        assert sorted(batch.failures) == [1, 3]
        assert "bad.jpg" in batch.failures[1] and "gone.png" in batch.failures[3]
        assert batch.images.shape == (2, 3, 16, 16)
        assert torch.equal(batch.images[0], load_image_pm1(paths[0], 16))
        assert torch.equal(batch.images[1], load_image_pm1(paths[2], 16))
    nothing = decode_with_pil([tmp_path / "bad.jpg"], 8)
    assert nothing.images.shape == (0, 3, 8, 8) and list(nothing.failures) == [0]


def test_select_decoder_falls_back_to_pil_without_a_gpu():
    decoder = select_decoder("auto", 16, 4, "cpu", num_workers=0)
    assert isinstance(decoder, PilDecoder) and decoder.device == torch.device("cpu")
    assert isinstance(select_decoder("pil", 16, 4, "cpu"), PilDecoder)
    with pytest.raises(ValueError, match="'dali' decodes on a GPU"):
        select_decoder("dali", 16, 4, "cpu")
    with pytest.raises(ValueError, match=r"'turbo' is not one of \('auto', 'pil', 'dali', 'dali-cpu'\)"):
        select_decoder("turbo", 16, 4, "cpu")
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        PilDecoder(16, num_workers=-1)
