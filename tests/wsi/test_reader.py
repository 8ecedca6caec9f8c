"""Slide readers: tifffile pyramids and strips, OpenSlide on the CC0 Aperio slide, Pillow with its bomb guard."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from breastcnn.errors import MissingDependencyError, UserInputError
from breastcnn.wsi import reader as reader_module
from breastcnn.wsi.reader import ImageReader, OpenSlideReader, TiffReader, open_slide
from tests.slides import MPP, tissue_image, write_pyramid_tiff


def test_pyramid_tiff_levels_resolution_and_exact_regions(pyramid_tiff):
    path, levels = pyramid_tiff
    with open_slide(path) as slide:
        assert isinstance(slide, TiffReader)
        assert slide.level_dimensions == [(2048, 1536), (1024, 768), (512, 384)]
        assert slide.level_downsamples == [1.0, 2.0, 4.0]
        assert slide.mpp == pytest.approx(MPP)
        for level, d in enumerate((1, 2, 4)):
            # a region straddling several 128-px TIFF tiles, (x, y) in level-0 pixels
            x, y, w, h = 200 * d, 250 * d, 157, 93
            expected = levels[level][250 : 250 + h, 200 : 200 + w]
            np.testing.assert_array_equal(slide.read_region(x, y, level, w, h), expected)
        # beyond the right/bottom edge and before the origin: white, like bare glass
        corner = slide.read_region(2048 - 10, 1536 - 5, 0, 30, 20)
        np.testing.assert_array_equal(corner[:5, :10], levels[0][-5:, -10:])
        assert (corner[5:] == 255).all() and (corner[:, 10:] == 255).all()
        assert (slide.read_region(-50, -50, 0, 40, 40) == 255).all()


@pytest.mark.parametrize(
    "options", [{"rowsperstrip": 16, "compression": "zlib"}, {}], ids=["compressed-strips", "uncompressed-memmap"]
)
def test_stripped_tiff_regions(tmp_path, slide_deps, options):
    import tifffile

    image = tissue_image()[:300, :500]
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, image, photometric="rgb", **options)
    with open_slide(path) as slide:
        assert slide.level_dimensions == [(500, 300)] and slide.mpp is None  # no resolution tags
        np.testing.assert_array_equal(slide.read_region(37, 41, 0, 111, 222)[: 259 - 41], image[41:259, 37:148])


def test_greyscale_and_alpha_tiffs_become_rgb_on_white(tmp_path, slide_deps):
    import tifffile

    grey = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    tifffile.imwrite(tmp_path / "grey.tif", grey, tile=(32, 32), photometric="minisblack")
    with open_slide(tmp_path / "grey.tif") as slide:
        rgb = slide.read_region(0, 0, 0, 64, 64)
    expected = ((grey.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=-1))

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = (100, 0, 200)
    rgba[:, 16:, 3] = 255  # right half opaque, left half transparent
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, tile=(16, 16), photometric="rgb", extrasamples=["unassalpha"])
    with open_slide(tmp_path / "rgba.tif") as slide:
        out = slide.read_region(0, 0, 0, 32, 32)
    assert (out[:, :16] == 255).all() and (out[:, 16:] == (100, 0, 200)).all()


def test_openslide_reads_the_cc0_aperio_slide(cmu_slide):
    import openslide

    with open_slide(cmu_slide) as slide:
        assert isinstance(slide, OpenSlideReader) and slide.kind == "openslide (aperio)"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499) and slide.objective_power == 20
        region = slide.read_region(1000, 2000, 0, 64, 48)
    reference = openslide.OpenSlide(str(cmu_slide)).read_region((1000, 2000), 0, (64, 48))
    np.testing.assert_array_equal(region, np.asarray(reference.convert("RGB")))  # opaque inside the scan
    assert region.shape == (48, 64, 3) and region.dtype == np.uint8


def test_plain_image_above_pillows_bomb_limit_opens_up_to_our_cap(tmp_path, monkeypatch):
    image = tissue_image()[:200, :300]
    Image.fromarray(image).save(tmp_path / "plain.png")
    # Pillow refuses images over 2 x MAX_IMAGE_PIXELS; pretend this one is such a "bomb"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "plain.png")
    with open_slide(tmp_path / "plain.png") as slide:
        assert isinstance(slide, ImageReader) and slide.mpp is None
        np.testing.assert_array_equal(slide.read_region(10, 20, 0, 50, 40), image[20:60, 10:60])
    assert Image.MAX_IMAGE_PIXELS == 10_000  # the guard is restored for everyone else
    # ... and our own documented cap still refuses
    monkeypatch.setattr(reader_module, "PLAIN_IMAGE_MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(UserInputError, match=r"plain\.png: plain image of 300x200 pixels exceeds .* tiled"):
        open_slide(tmp_path / "plain.png")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.svs", None, "no such file"),
        ("empty.tif", b"", "cannot open as a slide"),
        ("notes.png", b"just some text, not an image", "cannot open as a slide"),
        ("truncated.tif", b"II*\x00\x08\x00\x00\x00\x99", "unsupported TIFF"),
        ("fake.svs", b"II*\x00" + b"\x00" * 64, "the TIFF holds no image"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path, slide_deps, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserInputError, match=message) as info:
        open_slide(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_openslide_names_the_install_command(tmp_path, monkeypatch):
    path = tmp_path / "scan.svs"
    path.write_bytes(b"II*\x00" + b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'breastcnn\[slide\]'"):
        open_slide(path)
    # a plain image needs no OpenSlide
    Image.fromarray(tissue_image()[:50, :50]).save(tmp_path / "small.png")
    with open_slide(tmp_path / "small.png") as slide:
        assert slide.dimensions == (50, 50)


def test_tiff_without_resolution_and_72_dpi_default_have_unknown_mpp(tmp_path, slide_deps):
    import tifffile

    tifffile.imwrite(
        tmp_path / "dpi.tif",
        tissue_image()[:64, :64],
        tile=(32, 32),
        photometric="rgb",
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    with open_slide(tmp_path / "dpi.tif") as slide:
        assert slide.mpp is None  # 353 um/px is a default tag, not a microscope
    write_pyramid_tiff(tmp_path / "inch.tif", tissue_image()[:256, :256], downsamples=(1,), mpp=None)
    with open_slide(tmp_path / "inch.tif") as slide:
        assert slide.mpp is None


def test_big_endian_uncompressed_16_bit_tiff_is_memory_mapped_right(tmp_path, slide_deps):
    import tifffile

    grey = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 31
    tifffile.imwrite(tmp_path / "be.tif", grey, byteorder=">", photometric="minisblack")
    with open_slide(tmp_path / "be.tif") as slide:
        out = slide.read_region(5, 7, 0, 20, 10)
    expected = ((grey[7:17, 5:25].astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_a_folder_is_not_a_slide(tmp_path):
    with pytest.raises(UserInputError, match="is a folder"):
        open_slide(tmp_path)


def test_missing_tifffile_and_scikit_image_name_the_install_command(tmp_path, pyramid_tiff, monkeypatch):
    from breastcnn.wsi.tissue import require_skimage

    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(MissingDependencyError, match=r"tifffile is not installed: pip install 'breastcnn\[slide\]'"):
        open_slide(pyramid_tiff[0])
    for module in ("skimage", "skimage.filters"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        MissingDependencyError, match=r"scikit-image is not installed: pip install 'breastcnn\[slide\]'"
    ):
        require_skimage()
