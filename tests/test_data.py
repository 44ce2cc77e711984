"""The data layer: scanning kohya folders, serving crops, and the bundled sample dataset."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toy_world.world import HELD_OUT_SHAPE, render, scenes, sentence_caption
from training.data.bucket_sampler import BucketBatchSampler
from training.data.buckets import generate_buckets
from training.data.dataset import CaptionedImageDataset, collate_captioned
from training.data.missing_captions import apply_missing_captions, missing_captions_table, missing_captions_warning
from training.data.scan import IMAGE_EXTENSIONS, ImageRecord, match_reg_records, scan_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_sample_dataset.py"


def write_image(path: Path, size: tuple[int, int] = (16, 16), colour=(255, 0, 0), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def write_array(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8), "RGB").save(path)
    return path


def problems_text(scan) -> str:
    return "\n".join(scan.problems)


# --- scan_dataset: layout, repeats, captions


def test_kohya_repeats_are_counted_per_folder(tmp_path):
    write_image(tmp_path / "root.png")
    write_image(tmp_path / "3_cats" / "a.png")
    write_image(tmp_path / "3_cats" / "b.jpg")
    write_image(tmp_path / "5_dogs" / "c.webp")

    scan = scan_dataset(tmp_path)

    assert scan.problems == []
    repeats = {r.path.name: r.repeats for r in scan.records}
    assert repeats == {"root.png": 1, "a.png": 3, "b.jpg": 3, "c.webp": 5}
    assert scan.num_samples == 1 + 3 + 3 + 5


def test_scan_order_is_sorted_and_repeatable(tmp_path):
    for name in ["b.png", "a.png", "c.png"]:
        write_image(tmp_path / "2_x" / name)
    first = [r.path.name for r in scan_dataset(tmp_path).records]
    assert first == ["a.png", "b.png", "c.png"]
    assert [r.path.name for r in scan_dataset(tmp_path).records] == first


def test_captions_are_read_stripped_and_missing_ones_are_empty(tmp_path):
    write_image(tmp_path / "1_x" / "with.png")
    (tmp_path / "1_x" / "with.txt").write_text("  a red circle, sks \n", encoding="utf-8")
    write_image(tmp_path / "1_x" / "without.png")

    captions = {r.path.name: r.caption for r in scan_dataset(tmp_path).records}

    assert captions == {"with.png": "a red circle, sks", "without.png": ""}


def test_caption_extension_is_honoured_and_bom_is_not_part_of_the_caption(tmp_path):
    write_image(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("wrong file", encoding="utf-8")
    (tmp_path / "img.caption").write_bytes("\ufeffright file".encode())

    scan = scan_dataset(tmp_path, caption_extension=".caption")

    assert [r.caption for r in scan.records] == ["right file"]


def test_upper_case_extensions_count_and_other_files_are_ignored(tmp_path):
    write_image(tmp_path / "A.PNG")
    (tmp_path / "notes.md").write_text("hello", encoding="utf-8")
    (tmp_path / "A.txt").write_text("cap", encoding="utf-8")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / ".ipynb_checkpoints").mkdir()

    scan = scan_dataset(tmp_path)

    assert scan.problems == []
    assert [(r.path.name, r.caption) for r in scan.records] == [("A.PNG", "cap")]


# --- scan_dataset: problems name the key or file and the fix


@pytest.mark.parametrize("train_dir", [None, ""])
def test_unset_train_dir_is_a_problem_naming_the_key(train_dir):
    scan = scan_dataset(train_dir)
    assert scan.records == []
    assert len(scan.problems) == 1
    assert "data.train_dir" in scan.problems[0]
    assert "data.train_dir=" in scan.problems[0]  # says how to set it


def test_missing_folder_is_a_problem_naming_key_and_path(tmp_path):
    missing = tmp_path / "nope"
    scan = scan_dataset(missing)
    assert len(scan.problems) == 1
    assert "data.train_dir" in scan.problems[0]
    assert str(missing) in scan.problems[0]
    assert "does not exist" in scan.problems[0]


def test_the_key_named_in_messages_is_configurable(tmp_path):
    scan = scan_dataset(tmp_path / "nope", key="data.reg_dir")
    assert "data.reg_dir" in problems_text(scan)
    assert "data.train_dir" not in problems_text(scan)


def test_a_file_instead_of_a_folder_is_a_problem(tmp_path):
    file = write_image(tmp_path / "one.png")
    scan = scan_dataset(file)
    assert len(scan.problems) == 1
    assert str(file) in scan.problems[0] and "not a folder" in scan.problems[0]


def test_empty_folder_is_a_problem_listing_extensions_and_layout(tmp_path):
    (tmp_path / "4_empty").mkdir()
    (tmp_path / "4_empty" / "caption.txt").write_text("orphan", encoding="utf-8")

    scan = scan_dataset(tmp_path)

    assert scan.records == []
    text = problems_text(scan)
    assert "no images found" in text
    assert all(ext in text for ext in IMAGE_EXTENSIONS)
    assert "<repeats>_<name>" in text


def test_folder_not_in_kohya_layout_is_a_problem_suggesting_a_name(tmp_path):
    write_image(tmp_path / "1_good" / "a.png")
    write_image(tmp_path / "extras" / "b.png")

    scan = scan_dataset(tmp_path)

    assert [r.path.name for r in scan.records] == ["a.png"]  # the stray folder's image is not used
    assert len(scan.problems) == 1
    assert "extras" in scan.problems[0]
    assert "1_extras" in scan.problems[0]


def test_zero_repeats_folder_is_a_problem(tmp_path):
    write_image(tmp_path / "1_good" / "a.png")
    write_image(tmp_path / "0_never" / "b.png")

    scan = scan_dataset(tmp_path)

    assert len(scan.problems) == 1
    assert "0_never" in scan.problems[0] and "0 repeats" in scan.problems[0]
    assert "1_never" in scan.problems[0]


def _corrupt_dataset(tmp_path: Path) -> tuple[Path, Path]:
    good = write_image(tmp_path / "2_x" / "good.png", size=(64, 64))
    bad = tmp_path / "2_x" / "bad.png"
    # A valid header with the pixel data cut off: Image.open() succeeds, only decoding fails.
    write_array(bad, np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    bad.write_bytes(bad.read_bytes()[:200])
    with Image.open(bad) as image:
        assert image.size == (64, 64)  # the header alone looks fine
    return good, bad


def test_corrupt_image_is_a_problem_by_default(tmp_path):
    good, bad = _corrupt_dataset(tmp_path)

    scan = scan_dataset(tmp_path)

    assert [r.path for r in scan.records] == [good]
    assert len(scan.problems) == 1
    assert str(bad) in scan.problems[0]
    assert "data.on_bad_image=skip" in scan.problems[0]
    assert scan.skipped == []


def test_corrupt_image_is_skipped_and_listed_when_asked(tmp_path):
    good, _ = _corrupt_dataset(tmp_path)
    (tmp_path / "2_x" / "junk.jpg").write_bytes(b"not an image at all")

    scan = scan_dataset(tmp_path, on_bad_image="skip")

    assert scan.problems == []
    assert [r.path for r in scan.records] == [good]
    assert sorted(path.name for path, _ in scan.skipped) == ["bad.png", "junk.jpg"]
    assert all(reason for _, reason in scan.skipped)
    assert scan.num_samples == 2


def test_all_images_skipped_is_still_a_problem(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"garbage")
    scan = scan_dataset(tmp_path, on_bad_image="skip")
    assert scan.records == []
    assert len(scan.skipped) == 1
    assert "skipped" in problems_text(scan)


def test_invalid_on_bad_image_value_is_a_problem_naming_the_key(tmp_path):
    write_image(tmp_path / "a.png")
    scan = scan_dataset(tmp_path, on_bad_image="ignore")
    assert len(scan.problems) == 1
    assert "data.on_bad_image" in scan.problems[0] and "'ignore'" in scan.problems[0]


def test_non_utf8_caption_is_a_problem_naming_the_file(tmp_path):
    write_image(tmp_path / "a.png")
    caption = tmp_path / "a.txt"
    caption.write_bytes("caf\u00e9 au lait".encode("latin-1"))

    scan = scan_dataset(tmp_path)

    assert len(scan.problems) == 1
    assert str(caption) in scan.problems[0]
    assert "UTF-8" in scan.problems[0]


def test_all_problems_are_reported_together(tmp_path):
    _, bad = _corrupt_dataset(tmp_path)
    write_image(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes(b"\xff\xfe\xfa")
    write_image(tmp_path / "misc" / "c.png")

    text = problems_text(scan_dataset(tmp_path))

    assert str(bad) in text
    assert "latin.txt" in text
    assert "misc" in text


# --- images without caption files (data.missing_captions) and images too deep to be read (issue 15)


def captioned(path: Path, caption: str | None, extension: str = ".txt") -> Path:
    write_image(path)
    if caption is not None:
        path.with_suffix(extension).write_text(caption, encoding="utf-8")
    return path


def test_captions_under_another_extension_are_an_error_that_names_it(tmp_path):
    for i in range(3):
        captioned(tmp_path / "10_thing" / f"{i}.png", f"a red thing {i}", extension=".caption")

    scan = scan_dataset(tmp_path)  # data.caption_extension=.txt, the default
    assert scan.problems == [] and [r.caption for r in scan.records] == ["", "", ""]
    checked = apply_missing_captions(scan, "error", ".txt", "data.train_dir")

    assert len(checked.problems) == 1
    problem = checked.problems[0]
    assert "data.train_dir: 3 of 3 images have no .txt caption file" in problem
    assert ".caption (3)" in problem and "set data.caption_extension=.caption" in problem
    assert str(tmp_path / "10_thing" / "0.png") in problem
    assert "data.missing_captions=class_tokens" in problem and "data.missing_captions=warn" in problem


def test_a_few_missing_captions_stop_the_run_by_default_naming_count_and_files(make_cfg, tmp_path):
    from sweeper.config.validate import ConfigError, validate

    for i in range(8):
        captioned(tmp_path / "data" / "5_dots" / f"{i}.png", None if i in (2, 3, 4, 5, 6, 7) else "a dot")
    with pytest.raises(ConfigError) as caught:
        validate(make_cfg(f"data.train_dir={tmp_path / 'data'}"))

    message = str(caught.value)
    assert "6 of 8 images have no .txt caption file" in message
    assert "'" + str(tmp_path / "data" / "5_dots" / "6.png") + "' and 1 more" in message  # the first five, then a count
    assert "another extension" not in message  # none beside them
    validated = validate(make_cfg(f"data.train_dir={tmp_path / 'data'}", "data.missing_captions=warn"))
    assert len(validated.dataset.uncaptioned) == 6


def test_class_tokens_caption_uncaptioned_images_with_their_folder_name(tmp_path):
    captioned(tmp_path / "10_sks dog" / "a.png", None)
    captioned(tmp_path / "10_sks dog" / "b.png", "sks dog on the beach")
    captioned(tmp_path / "2_cat" / "c.png", None)
    scan = scan_dataset(tmp_path)

    fixed = apply_missing_captions(scan, "class_tokens", ".txt", "data.train_dir")
    assert fixed.problems == []
    assert {r.path.name: r.caption for r in fixed.records} == {
        "a.png": "sks dog",
        "b.png": "sks dog on the beach",
        "c.png": "cat",
    }
    assert (
        missing_captions_table([fixed])
        == f"image\tcaption\n{tmp_path / '10_sks dog' / 'a.png'}\tsks dog\n{tmp_path / '2_cat' / 'c.png'}\tcat\n"
    )
    warning = missing_captions_warning(fixed, "class_tokens", ".txt", "data.train_dir")
    assert warning.startswith("warning: data.train_dir: 2 of 3 images have no .txt caption file")
    assert "class tokens" in warning and "data.missing_captions=class_tokens" in warning


def test_class_tokens_cannot_caption_an_image_outside_a_repeats_folder(tmp_path):
    captioned(tmp_path / "loose.png", None)
    captioned(tmp_path / "3_ok" / "a.png", "a caption")
    fixed = apply_missing_captions(scan_dataset(tmp_path), "class_tokens", ".txt", "data.reg_dir")
    assert len(fixed.problems) == 1
    assert "data.reg_dir" in fixed.problems[0] and str(tmp_path / "loose.png") in fixed.problems[0]


def test_warn_trains_uncaptioned_images_on_an_empty_caption_and_says_so(tmp_path):
    captioned(tmp_path / "1_x" / "a.png", None)
    captioned(tmp_path / "1_x" / "b.png", "a b")
    (tmp_path / "1_x" / "a.tags").write_text("a, tags", encoding="utf-8")
    scan = scan_dataset(tmp_path)

    kept = apply_missing_captions(scan, "warn", ".txt", "data.train_dir")
    assert kept.problems == [] and {r.path.name: r.caption for r in kept.records} == {"a.png": "", "b.png": "a b"}
    warning = missing_captions_warning(kept, "warn", ".txt", "data.train_dir")
    assert "1 of 2 images" in warning and "train on an empty caption" in warning
    assert "data.caption_extension=.tags" in warning
    assert missing_captions_warning(kept, "error", ".txt", "data.train_dir") is None


def test_images_in_sub_subfolders_are_named_when_no_image_is_found(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "10_thing" / "batch1" / name)
    write_image(tmp_path / "10_thing" / "batch2" / "c.jpg")

    scan = scan_dataset(tmp_path)

    assert len(scan.problems) == 1
    problem = scan.problems[0]
    assert "no images found" in problem and "sub-subfolders are not read" in problem
    assert "'10_thing/batch1' (2 images), '10_thing/batch2' (1 image)" in problem
    assert "put images in" not in problem  # the old advice, which the user had followed


def test_a_repeats_folder_with_only_deeper_images_is_a_problem_beside_good_folders(tmp_path):
    captioned(tmp_path / "5_good" / "a.png", "a")
    write_image(tmp_path / "10_thing" / "batch1" / "b.png")

    scan = scan_dataset(tmp_path)

    assert [r.path.name for r in scan.records] == ["a.png"]
    assert len(scan.problems) == 1
    assert str(tmp_path / "10_thing") in scan.problems[0] and "'batch1' (1 image)" in scan.problems[0]
    assert "not read" in scan.problems[0]


# --- CaptionedImageDataset


def test_length_and_items_follow_repeats(tmp_path):
    records = [
        ImageRecord(write_image(tmp_path / "a.png", colour=(0, 0, 0)), "black", 2),
        ImageRecord(write_image(tmp_path / "b.png", colour=(255, 255, 255)), "white", 3),
    ]
    dataset = CaptionedImageDataset(records, resolution=8)

    assert len(dataset) == 5
    assert [dataset[i]["index"] for i in range(5)] == [0, 0, 1, 1, 1]
    assert [dataset[i]["caption"] for i in range(5)] == ["black"] * 2 + ["white"] * 3
    with pytest.raises(IndexError):
        dataset[5]


def test_item_is_float_tensor_in_minus_one_to_one(tmp_path):
    rng = np.random.default_rng(0)
    path = write_array(tmp_path / "noise.png", rng.integers(0, 256, (40, 56, 3)))
    array = np.zeros((20, 20, 3))
    array[:, 10:] = 255
    black_white = write_array(tmp_path / "bw.png", array)
    dataset = CaptionedImageDataset([ImageRecord(path, "", 1), ImageRecord(black_white, "", 1)], resolution=32)

    pixels = dataset[0]["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() < -0.9 and pixels.max() > 0.9  # the full range is used, not [0, 1]

    bw = CaptionedImageDataset([ImageRecord(black_white, "", 1)], resolution=20, center_crop=True)[0]
    assert torch.all(bw["pixel_values"][:, :, :10] == -1.0)
    assert torch.all(bw["pixel_values"][:, :, 10:] == 1.0)


def test_grey_and_transparent_images_become_rgb(tmp_path):
    grey = write_image(tmp_path / "grey.png", colour=128, mode="L")
    clear = write_image(tmp_path / "clear.png", colour=(0, 0, 0, 0), mode="RGBA")
    dataset = CaptionedImageDataset([ImageRecord(grey, "", 1), ImageRecord(clear, "", 1)], resolution=16)

    assert dataset[0]["pixel_values"].shape == (3, 16, 16)
    assert torch.allclose(dataset[0]["pixel_values"], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    assert torch.all(dataset[1]["pixel_values"] == 1.0)  # transparent -> white, not black


def test_short_side_is_resized_to_resolution_then_center_cropped(tmp_path):
    # 32 wide x 16 high: left quarter red, middle half green, right quarter blue.
    array = np.zeros((16, 32, 3))
    array[:, :8, 0] = 255
    array[:, 8:24, 1] = 255
    array[:, 24:, 2] = 255
    path = write_array(tmp_path / "wide.png", array)

    item = CaptionedImageDataset([ImageRecord(path, "", 1)], resolution=8)[0]

    # Downscaled to 16x8, the 8x8 center crop lies inside the green band.
    assert item["pixel_values"].shape == (3, 8, 8)
    centre = item["pixel_values"][:, :, 2:6]
    assert torch.all(centre[1] > 0.9) and torch.all(centre[0] < -0.9) and torch.all(centre[2] < -0.9)
    assert item["original_size"] == (16, 32)
    assert item["crop_top_left"] == (0, 4)


def _column_ramp(tmp_path: Path) -> tuple[Path, np.ndarray]:
    array = np.repeat(np.arange(48, dtype=np.float64)[None, :, None] * 5, 16, axis=0).repeat(3, axis=2)
    return write_array(tmp_path / "ramp.png", array), array


def test_center_crop_is_always_the_middle(tmp_path):
    path, array = _column_ramp(tmp_path)  # 48 wide, 16 high: no resize at resolution 16
    dataset = CaptionedImageDataset([ImageRecord(path, "", 1)], resolution=16, center_crop=True)

    expected = torch.from_numpy(array[:, 16:32].transpose(2, 0, 1) / 127.5 - 1).float()
    for _ in range(5):
        assert torch.allclose(dataset[0]["pixel_values"], expected)


def test_random_crop_varies_and_stays_inside_the_image(tmp_path):
    path, array = _column_ramp(tmp_path)
    dataset = CaptionedImageDataset([ImageRecord(path, "", 1)], resolution=16, random_crop=True)

    torch.manual_seed(0)
    lefts = set()
    for _ in range(40):
        item = dataset[0]
        left = item["crop_top_left"][1]
        expected = torch.from_numpy(array[:, left : left + 16].transpose(2, 0, 1) / 127.5 - 1).float()
        assert torch.allclose(item["pixel_values"], expected)
        lefts.add(left)
    assert len(lefts) > 5
    assert min(lefts) >= 0 and max(lefts) <= 32

    torch.manual_seed(123)
    first = [dataset[0]["crop_top_left"] for _ in range(10)]
    torch.manual_seed(123)
    assert [dataset[0]["crop_top_left"] for _ in range(10)] == first  # seeded by the torch RNG


def test_decoded_images_are_cached(tmp_path):
    path = write_image(tmp_path / "a.png", size=(20, 20), colour=(0, 255, 0))
    dataset = CaptionedImageDataset([ImageRecord(path, "", 3)], resolution=16)

    first = dataset[0]["pixel_values"]
    path.unlink()  # a re-decode would fail now

    assert torch.equal(dataset[2]["pixel_values"], first)


def test_collate_stacks_pixels_and_lists_the_rest(tmp_path):
    records = [ImageRecord(write_image(tmp_path / f"{i}.png"), f"cap {i}", 1) for i in range(3)]
    dataset = CaptionedImageDataset(records, resolution=8)

    batch = collate_captioned([dataset[i] for i in range(3)])

    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["caption"] == ["cap 0", "cap 1", "cap 2"]
    assert batch["index"] == [0, 1, 2]


def test_works_with_a_dataloader(tmp_path):
    records = [ImageRecord(write_image(tmp_path / f"{i}.png"), str(i), 2) for i in range(3)]
    loader = torch.utils.data.DataLoader(
        CaptionedImageDataset(records, resolution=8), batch_size=4, collate_fn=collate_captioned
    )
    batches = list(loader)
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 2]
    assert sorted(i for b in batches for i in b["index"]) == [0, 0, 1, 1, 2, 2]


# --- regularisation images


def reg_records(tmp_path: Path, repeats: list[int]) -> list[ImageRecord]:
    return [ImageRecord(tmp_path / f"reg{i}.png", "a photo of a dog", r) for i, r in enumerate(repeats)]


def test_few_reg_images_are_repeated_to_the_training_count(tmp_path):
    matched = match_reg_records(reg_records(tmp_path, [1, 1, 1]), n_train_samples=8)

    assert [r.repeats for r in matched] == [3, 3, 2]
    assert sum(r.repeats for r in matched) == 8
    assert all(r.is_reg for r in matched)
    assert [r.path.name for r in matched] == ["reg0.png", "reg1.png", "reg2.png"]


def test_many_reg_images_are_truncated_to_the_training_count(tmp_path):
    matched = match_reg_records(reg_records(tmp_path, [1] * 10), n_train_samples=4)
    assert [r.path.name for r in matched] == ["reg0.png", "reg1.png", "reg2.png", "reg3.png"]
    assert [r.repeats for r in matched] == [1, 1, 1, 1]


def test_reg_folder_repeats_count_in_the_first_pass(tmp_path):
    # kohya: the first pass adds each record's folder repeats, later passes one use at a time.
    assert [r.repeats for r in match_reg_records(reg_records(tmp_path, [5, 5]), 7)] == [5, 2]
    assert [r.repeats for r in match_reg_records(reg_records(tmp_path, [2, 1]), 7)] == [4, 3]


def test_reg_matching_edge_cases(tmp_path):
    assert match_reg_records([], 5) == []
    assert match_reg_records(reg_records(tmp_path, [1]), 0) == []
    assert [r.repeats for r in match_reg_records(reg_records(tmp_path, [0, 1]), 3)] == [3]
    original = reg_records(tmp_path, [1])
    match_reg_records(original, 3)
    assert original[0].repeats == 1 and not original[0].is_reg  # inputs are not modified


def test_items_say_whether_they_are_regularisation(tmp_path):
    train = ImageRecord(write_image(tmp_path / "t.png"), "sks dog", 2)
    reg = match_reg_records([ImageRecord(write_image(tmp_path / "r.png"), "dog", 1)], 2)
    dataset = CaptionedImageDataset([train, *reg], resolution=8)
    assert [dataset[i]["is_reg"] for i in range(len(dataset))] == [False, False, True, True]


# --- buckets and augmentation in the dataset


def _shapes(tmp_path: Path) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    sizes = {"wide": (96, 48), "tall": (40, 80), "square": (64, 64), "wide2": (120, 64)}
    return [
        ImageRecord(write_array(tmp_path / f"{name}.png", rng.integers(0, 256, (h, w, 3))), name, 2)
        for name, (w, h) in sizes.items()
    ]


def test_items_have_their_buckets_size(tmp_path):
    buckets = generate_buckets(64, 32, 128, 16)
    dataset = CaptionedImageDataset(_shapes(tmp_path), resolution=64, buckets=buckets, step=16)

    seen = {}
    for i in range(len(dataset)):
        item = dataset[i]
        width, height = item["bucket"]
        assert item["bucket"] in buckets
        assert item["pixel_values"].shape == (3, height, width)
        assert dataset.bucket_of(i) == item["bucket"]
        seen[item["caption"]] = item["bucket"]
    assert seen["wide"][0] > seen["wide"][1]  # landscape stays landscape
    assert seen["tall"][0] < seen["tall"][1]
    assert seen["square"] == (64, 64)
    assert dataset.sample_buckets() == [dataset.bucket_of(i) for i in range(len(dataset))]


def test_without_buckets_every_item_is_the_square_resolution(tmp_path):
    dataset = CaptionedImageDataset(_shapes(tmp_path), resolution=32)
    for i in range(len(dataset)):
        assert dataset[i]["pixel_values"].shape == (3, 32, 32)
        assert dataset[i]["bucket"] == (32, 32) == dataset.bucket_of(i)


def test_no_upscale_items_keep_their_size_rounded_down(tmp_path):
    path = write_array(tmp_path / "small.png", np.random.default_rng(1).integers(0, 256, (40, 70, 3)))
    dataset = CaptionedImageDataset(
        [ImageRecord(path, "", 1)], resolution=64, buckets=generate_buckets(64, 32, 128, 16), no_upscale=True, step=16
    )
    item = dataset[0]
    assert item["bucket"] == (64, 32)  # 70x40 rounded down to multiples of 16; min_side ignored
    assert item["pixel_values"].shape == (3, 32, 64)
    # Not resized, only center-cropped: the pixels are the image's own.
    with Image.open(path) as image:
        expected = to_unit(np.asarray(image)[4:36, 3:67])
    assert torch.allclose(item["pixel_values"], expected)


def to_unit(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1)


def test_exif_rotated_images_are_bucketed_by_their_upright_shape(tmp_path):
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 wide x 40 high, displayed rotated: 40 wide x 80 high
    Image.new("RGB", (80, 40), (10, 200, 10)).save(path, exif=exif)
    dataset = CaptionedImageDataset(
        [ImageRecord(path, "", 1)], resolution=64, buckets=generate_buckets(64, 32, 128, 16), step=16
    )
    width, height = dataset.bucket_of(0)
    assert width < height
    assert dataset[0]["pixel_values"].shape == (3, height, width)


def test_flip_aug_mirrors_about_half_the_items(tmp_path):
    path, array = _column_ramp(tmp_path)
    dataset = CaptionedImageDataset([ImageRecord(path, "", 1)], resolution=16, flip_aug=True)
    plain = to_unit(array[:, 16:32])

    torch.manual_seed(0)
    flips = []
    for _ in range(40):
        item = dataset[0]
        expected = torch.flip(plain, dims=[2]) if item["flipped"] else plain
        assert torch.allclose(item["pixel_values"], expected)
        flips.append(item["flipped"])
    assert 8 <= sum(flips) <= 32
    assert not any(CaptionedImageDataset([ImageRecord(path, "", 1)], resolution=16)[0]["flipped"] for _ in range(5))


def test_color_aug_changes_colour_but_not_brightness(tmp_path):
    array = np.zeros((16, 16, 3))
    array[..., 0] = 220
    array[..., 1] = 60
    array[..., 2] = 30
    path = write_array(tmp_path / "orange.png", array)
    dataset = CaptionedImageDataset([ImageRecord(path, "", 1)], resolution=16, color_aug=True, max_hue_shift=0.2)

    torch.manual_seed(0)
    items = [dataset[0]["pixel_values"] for _ in range(10)]
    assert len({tuple(item[:, 0, 0].tolist()) for item in items}) > 3
    for item in items:
        assert item.max(dim=0).values.max() == pytest.approx(220 / 127.5 - 1, abs=1 / 127.5)


def test_augmentations_repeat_for_a_fixed_seed(tmp_path):
    dataset = CaptionedImageDataset(
        _shapes(tmp_path),
        resolution=64,
        random_crop=True,
        flip_aug=True,
        color_aug=True,
        buckets=generate_buckets(64, 32, 128, 16),
        step=16,
    )

    def draw(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [dataset[i]["pixel_values"] for i in range(len(dataset))]

    first = draw(3)
    assert all(torch.equal(a, b) for a, b in zip(first, draw(3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, draw(4), strict=True))


def test_bucketed_batches_stack_through_a_dataloader(tmp_path):
    dataset = CaptionedImageDataset(
        _shapes(tmp_path), resolution=64, buckets=generate_buckets(64, 32, 128, 16), step=16
    )
    sampler = BucketBatchSampler(dataset.sample_buckets(), 3, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_captioned)

    seen = []
    for batch in loader:
        assert len(set(batch["bucket"])) == 1
        width, height = batch["bucket"][0]
        assert batch["pixel_values"].shape[1:] == (3, height, width)
        assert batch["flipped"] == [False] * len(batch["index"])
        seen += batch["index"]
    assert sorted(seen) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_crop_mode_describes_the_pixels(tmp_path):
    records = _shapes(tmp_path)
    assert CaptionedImageDataset(records, 32).crop_mode == "center"
    assert CaptionedImageDataset(records, 32, random_crop=True).crop_mode == "random"
    assert CaptionedImageDataset(records, 32, center_crop=False).crop_mode == "top_left"
    bucketed = CaptionedImageDataset(records, 64, buckets=[(64, 64)], no_upscale=True, step=16)
    assert bucketed.crop_mode == "center+no_upscale"


# --- the sample dataset script


def run_script(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], check=True, capture_output=True)


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_script_is_deterministic(tmp_path):
    run_script(tmp_path / "one")
    run_script(tmp_path / "two")
    one, two = read_tree(tmp_path / "one"), read_tree(tmp_path / "two")
    assert len([name for name in one if name.endswith(".png")]) >= 10
    assert one == two
    run_script(tmp_path / "three", "--seed", "1")
    assert read_tree(tmp_path / "three") != one


def test_committed_sample_data_matches_the_script(tmp_path):
    run_script(tmp_path / "fresh")
    assert read_tree(tmp_path / "fresh") == read_tree(REPO / "data" / "sample")


@pytest.mark.parametrize("shape", ["moon", "arrow"])
def test_committed_concept_data_match_the_script(tmp_path, shape):
    run_script(tmp_path / "fresh", "--shape", shape)
    assert read_tree(tmp_path / "fresh") == read_tree(REPO / "data" / f"sample_{shape}")
    assert {p.name for p in (tmp_path / "fresh").iterdir()} == {"README.md", f"10_{shape}"}


def test_sample_dataset_is_small_and_scans_cleanly(tmp_path):
    run_script(tmp_path)
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= 200_000
    scan = scan_dataset(tmp_path)
    assert scan.problems == []
    assert all(r.repeats == 10 for r in scan.records)
    assert all(r.caption for r in scan.records)


def test_sample_is_the_held_out_concept_with_world_captions(tmp_path):
    """Every sample image is the toy world's rendering of a star scene, captioned as the world says."""
    run_script(tmp_path)
    records = sorted(scan_dataset(tmp_path).records, key=lambda r: r.path)
    expected = scenes(0, len(records), shapes=[HELD_OUT_SHAPE])
    assert len(records) == 16
    for record, scene in zip(records, expected, strict=True):
        assert scene.shape == HELD_OUT_SHAPE
        assert record.caption == sentence_caption(scene)
        with Image.open(record.path) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
            assert np.array_equal(np.asarray(image), np.asarray(render(scene)))


def test_sample_script_main_is_importable(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_sample_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path), "--count", "3"])
    assert len(list((tmp_path / "10_star").glob("*.png"))) == 3


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("no_upscale", [False, True])
def test_items_without_pixels_carry_the_same_geometry(tmp_path, flip, no_upscale):
    sizes = [(96, 48), (40, 100), (64, 64), (70, 30)]
    records = [ImageRecord(write_image(tmp_path / f"{i}.png", size), "c", 1) for i, size in enumerate(sizes)]
    buckets = generate_buckets(64, 32, 128, 16)

    def items(load_pixels: bool) -> list[dict]:
        dataset = CaptionedImageDataset(records, 64, flip_aug=flip, buckets=buckets, no_upscale=no_upscale, step=16)
        dataset.load_pixels = load_pixels
        torch.manual_seed(3)  # the flips draw from torch's RNG in both passes alike
        return [dataset[i] for i in range(len(dataset))]

    with_pixels, without = items(True), items(False)
    assert all("pixel_values" not in item for item in without)
    for full, light in zip(with_pixels, without, strict=True):
        assert {k: v for k, v in full.items() if k != "pixel_values"} == light
    assert any(item["flipped"] for item in with_pixels) == flip


def test_fixed_crop_equals_the_item_pixels(tmp_path):
    records = [ImageRecord(write_image(tmp_path / "a.png", (40, 24), (10, 200, 30)), "c", 1)]
    dataset = CaptionedImageDataset(records, 16, flip_aug=True)
    torch.manual_seed(0)
    seen = {}
    for _ in range(20):
        item = dataset[0]
        seen[item["flipped"]] = item["pixel_values"]
    for flipped, pixels in seen.items():
        assert torch.equal(dataset.fixed_crop(0, flipped), pixels)
    with pytest.raises(ValueError, match="random_crop"):
        CaptionedImageDataset(records, 16, random_crop=True).fixed_crop(0, False)
