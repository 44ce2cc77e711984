"""Bad input fails before any training, with a message naming the file or key and what to do."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sweeper.run.task
from sweeper.config.validate import ConfigError
from sweeper.run.setting import run


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Any of these runs reaching the model loader has failed the test: errors come first."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the config was rejected")

    monkeypatch.setattr(sweeper.run.task, "load_base_model", refuse)


def image_folder(root: Path, count: int = 2) -> Path:
    folder = root / "5_things"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(f"a red square {i}", encoding="utf-8")
    return root


def rejected(cfg) -> str:
    with pytest.raises(ConfigError) as caught:
        run(cfg, show_progress=False)
    return str(caught.value)


def test_missing_train_dir(make_cfg, tmp_path):
    message = rejected(make_cfg(f"data.train_dir={tmp_path / 'nowhere'}"))
    assert "data.train_dir" in message and "nowhere" in message and "does not exist" in message


def test_folder_without_images(make_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    message = rejected(make_cfg(f"data.train_dir={tmp_path / 'empty'}"))
    assert "data.train_dir" in message and "no images" in message.lower()


def test_corrupt_image_is_an_error_by_default(make_cfg, tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "5_things" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    message = rejected(make_cfg(f"data.train_dir={root}"))
    assert "broken.png" in message and "data.on_bad_image=skip" in message


def test_corrupt_image_skipped_when_asked(make_cfg, tmp_path, capsys):
    from sweeper.config.validate import validate

    root = image_folder(tmp_path / "data")
    (root / "5_things" / "broken.png").write_bytes(b"garbage")
    validated = validate(make_cfg(f"data.train_dir={root}", "data.on_bad_image=skip"))
    assert [p.name for p, _ in validated.dataset.skipped] == ["broken.png"]
    assert len(validated.dataset.records) == 2


def test_caption_not_utf8(make_cfg, tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "5_things" / "img_0.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    message = rejected(make_cfg(f"data.train_dir={root}"))
    assert "img_0.txt" in message and "UTF-8" in message


def test_alpha_and_scale_together(make_cfg):
    message = rejected(make_cfg("network.alpha=4", "network.scale=0.5"))
    assert "network.alpha" in message and "network.scale" in message


@pytest.mark.parametrize(
    "key", ["optimizer.lr", "network.unet_lr", "network.text_encoder_lr", "network.text_encoder_2_lr"]
)
def test_negative_learning_rate(make_cfg, key):
    message = rejected(make_cfg(f"{key}=-0.001"))
    assert key in message and "negative" in message


def test_every_problem_is_reported_at_once(make_cfg, tmp_path):
    message = rejected(
        make_cfg(f"data.train_dir={tmp_path / 'nowhere'}", "optimizer.lr=-1", "network.alpha=1", "network.scale=1")
    )
    assert "3 problem(s)" in message
    assert "data.train_dir" in message and "optimizer.lr" in message and "network.scale" in message


# --- output.dir and output.name (issue 14, point 12 and 16)


def unwritable_folder(tmp_path: Path) -> tuple[Path, str]:
    """A folder path that really refuses writes, and what makes it so.

    chmod does not stop root, so as root the folder's place is taken by a file (writing below it fails
    with "Not a directory" for anyone); otherwise the folder is made read-only, the issue's case.
    """
    folder = tmp_path / "readonly"
    folder.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        folder.rmdir()
        folder.write_text("a file where the output folder was", encoding="utf-8")
        how = "replaced by a file"
    else:
        folder.chmod(0o555)
        how = "read-only"
    with pytest.raises(OSError):  # the fault is real: otherwise the tests below would pass for nothing
        (folder / "probe").write_bytes(b"")
    return folder, how


@pytest.fixture
def restore_permissions(tmp_path):
    yield
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def test_unwritable_output_dir_is_a_startup_problem(make_cfg, tmp_path, restore_permissions):
    folder, _ = unwritable_folder(tmp_path)
    message = rejected(make_cfg(f"output.dir={folder / 'run'}"))
    assert "output.dir" in message and str(folder / "run") in message and "writable" in message


def test_output_dir_that_is_a_file(make_cfg, tmp_path):
    (tmp_path / "taken").write_text("x", encoding="utf-8")
    message = rejected(make_cfg(f"output.dir={tmp_path / 'taken'}"))
    assert "output.dir" in message and "is a file" in message


def test_output_dir_without_room_for_the_lora_file(make_cfg):
    # rank 10^9 makes the estimate (rank x layer widths x 4 bytes) larger than any real disk's free space
    message = rejected(make_cfg("network.dim=1000000000"))
    assert "output.dir" in message and "free" in message and "output.precision=fp16" in message


def test_output_dir_check_leaves_nothing_behind(make_cfg, tmp_path):
    target = tmp_path / "new" / "deeper"
    rejected(make_cfg(f"output.dir={target}", "optimizer.lr=-1"))  # rejected for another reason
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "a\\b", " "])
def test_output_name_must_be_a_plain_file_stem(make_cfg, name):
    message = rejected(make_cfg(f"output.name='{name}'"))
    assert "output.name" in message and "plain file name" in message


def test_lora_is_rescued_when_output_dir_fails_after_startup(make_cfg, tmp_path, monkeypatch, restore_permissions):
    """The folder passes startup validation, then breaks before the save: the trained file survives."""
    from mlflow.tracking import MlflowClient

    from training.families.loading import load_base_model
    from training.network.file import LoraNotSavedError, load_lora_file

    monkeypatch.setattr(sweeper.run.task, "load_base_model", load_base_model)  # this test does train
    faults: list[str] = []

    def save_after_breaking_the_folder(output_cfg, *args, **kwargs):
        broken, how = unwritable_folder(Path(output_cfg.dir).parent)
        faults.append(how)
        assert broken == Path(output_cfg.dir)
        return real_save(output_cfg, *args, **kwargs)

    real_save = sweeper.run.task.save_lora
    monkeypatch.setattr(sweeper.run.task, "save_lora", save_after_breaking_the_folder)
    cfg = make_cfg(f"output.dir={tmp_path / 'readonly'}", "train.max_steps=2", "eval.prompts=[a red circle]")
    with pytest.raises(LoraNotSavedError) as caught:
        run(cfg, show_progress=False)

    error, message = caught.value, str(caught.value)
    intended = tmp_path / "readonly" / "lora.safetensors"
    assert faults and error.intended == intended and str(intended) in message
    assert isinstance(error.__cause__, OSError) and str(error.__cause__) in message  # the original error
    assert error.rescued is not None and str(error.rescued) in message and error.rescued.is_file()
    assert error.rescued.parent.parent.name == "lora-sweeper-rescued"
    rescued = load_lora_file(error.rescued)
    assert rescued.dim == cfg.network.dim and rescued.metadata["ss_output_name"] == "lora"
    client = MlflowClient(cfg.tracking.uri)
    (failed,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert failed.info.status == "FAILED" and failed.data.tags["lora.rescued_to"] == str(error.rescued)


# --- non-finite numbers, unknown keys, unreadable init_weights (issue 14, point 16)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("network.text_encoder_lr=nan", "network.text_encoder_lr"),
        ("network.unet_lr=-inf", "network.unet_lr"),
        ("optimizer.weight_decay=nan", "optimizer.weight_decay"),
        ("scheduler.warmup_steps=inf", "scheduler.warmup_steps"),  # used to crash validation (int(inf))
        ("optimizer.betas=[0.9,nan]", "optimizer.betas[1]"),
        ("eval.guidance_scale=inf", "eval.guidance_scale"),
    ],
)
def test_non_finite_numbers_are_rejected(make_cfg, override, key):
    message = rejected(make_cfg(override))
    assert f"{key}=" in message and "not a finite number" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "+network.dimm=8",
            "network.dimm: not a config key, so it would be ignored; fix the spelling or remove it "
            "(did you mean network.dim?)",
        ),
        ("+eval.concept.lables=[a,b]", "did you mean eval.concept.labels?"),
        ("+optimzer.lr=0.1", "did you mean optimizer?"),
        ("+train.zzz=1", "train.zzz: not a config key"),
    ],
)
def test_unknown_keys_are_listed_with_a_suggestion(make_cfg, override, expected):
    assert expected in rejected(make_cfg(override))


def test_shipped_options_have_no_unknown_keys(make_cfg):
    from sweeper.config.schema_check import schema_problems

    for overrides in ([], ["+experiment=example"], ["optimizer=prodigy", "scheduler=plateau", "model=toy"]):
        assert schema_problems(make_cfg(*overrides)) == []


def test_init_weights_that_is_not_safetensors_is_listed_with_the_rest(make_cfg, tmp_path):
    fake = tmp_path / "lora.safetensors"
    fake.write_bytes(b"<html>this download was an error page</html>")
    message = rejected(make_cfg(f"network.init_weights={fake}", "optimizer.lr=-1"))
    assert "2 problem(s)" in message
    assert "network.init_weights" in message and str(fake) in message and "optimizer.lr" in message


# --- image modes (issue 14, point 15)


def plant(path: Path, image: Image.Image, **save_args) -> Path:
    image.save(path, **save_args)
    return path


SIXTEEN_BIT = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)  # -> 0, 128, 255, 4 in 8 bits


@pytest.mark.parametrize(
    "name, make, expected_mode",
    [
        ("g16.png", lambda: Image.fromarray(SIXTEEN_BIT), "I;16"),
        ("g16b.tiff", lambda: Image.frombytes("I;16B", (4, 1), SIXTEEN_BIT.astype(">u2").tobytes()), "I;16B"),
        ("g32.tiff", lambda: Image.fromarray(SIXTEEN_BIT.astype(np.int32)), "I"),
        ("float.tiff", lambda: Image.fromarray(SIXTEEN_BIT.astype(np.float32) / 65535), "F"),
    ],
)
def test_high_bit_depth_grayscale_is_scaled_not_clipped(tmp_path, name, make, expected_mode):
    from training.data.dataset import load_rgb

    path = plant(tmp_path / name, make())
    with Image.open(path) as opened:
        assert opened.mode == expected_mode
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (1, 4, 3)
    assert (rgb == np.array([0, 128, 255, 4])[None, :, None]).all(), rgb[..., 0]


def test_one_bit_and_cmyk_images_load_as_they_look(tmp_path):
    from training.data.dataset import load_rgb

    one_bit = plant(tmp_path / "mask.png", Image.fromarray(np.array([[False, True]])))
    assert np.asarray(load_rgb(one_bit))[..., 0].tolist() == [[0, 255]]
    cmyk = plant(tmp_path / "print.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=100)  # pure red
    assert np.abs(np.asarray(load_rgb(cmyk)).astype(int) - [255, 0, 0]).max() <= 2


@pytest.mark.parametrize(
    "values",
    [np.array([[0, 70000]], dtype=np.int32), np.array([[0.0, 200.0]], dtype=np.float32)],
    ids=["I-beyond-16-bit", "F-beyond-1"],
)
def test_grayscale_of_unknown_scale_is_rejected_naming_the_file(make_cfg, tmp_path, values):
    from training.data.dataset import load_rgb

    root = image_folder(tmp_path / "data")
    # a TIFF saved under a .png name: PIL goes by the content, as it would for a misnamed download
    odd = plant(root / "5_things" / "odd.png", Image.fromarray(values), format="TIFF")
    with pytest.raises(ValueError, match=r"odd\.png"):
        load_rgb(odd)
    message = rejected(make_cfg(f"data.train_dir={root}"))
    assert "odd.png" in message and "outside 0.." in message and "data.on_bad_image=skip" in message


def test_sixteen_bit_png_passes_the_startup_scan(tmp_path):
    from training.data.scan import scan_dataset

    root = image_folder(tmp_path / "data")
    plant(root / "5_things" / "deep.png", Image.fromarray(SIXTEEN_BIT))
    scan = scan_dataset(root)
    assert scan.problems == [] and "deep.png" in [r.path.name for r in scan.records]


# --- tiny images and symlink loops (issue 14, point 17)


def test_images_far_below_the_resolution_are_found(tmp_path):
    from training.data.dataset import small_images
    from training.data.scan import scan_dataset

    root = image_folder(tmp_path / "data")  # 32x32 images
    plant(root / "5_things" / "dot.png", Image.new("RGB", (1, 1), (255, 0, 0)))
    plant(root / "5_things" / "strip.png", Image.new("RGB", (200, 15), (255, 0, 0)))
    records = scan_dataset(root).records
    assert [(p.name, size) for p, size in small_images(records, 64)] == [("dot.png", (1, 1)), ("strip.png", (200, 15))]
    assert [p.name for p, _ in small_images(records, 256)] == ["dot.png", "img_0.png", "img_1.png", "strip.png"]
    assert small_images(records, 4) == []


def test_a_run_warns_about_tiny_images_and_logs_them(make_cfg, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from training.families.loading import load_base_model

    monkeypatch.setattr(sweeper.run.task, "load_base_model", load_base_model)  # this test does train
    root = image_folder(tmp_path / "data")
    dot = plant(root / "5_things" / "dot.png", Image.new("RGB", (1, 1), (255, 0, 0)))
    dot.with_suffix(".txt").write_text("a red dot", encoding="utf-8")  # uncaptioned images stop a run (issue 15)
    cfg = make_cfg(f"data.train_dir={root}", "train.max_steps=1", "eval.prompts=[a red square]")
    result = run(cfg, show_progress=False)
    assert f"warning: image {dot} is 1x1, under 1/4 of resolution 64: upscaled" in capsys.readouterr().out
    client = MlflowClient(result.tracking_uri)
    table = Path(client.download_artifacts(result.run_id, "data/small_images.tsv", str(tmp_path)))
    assert table.read_text(encoding="utf-8") == f"{dot}\t1x1\n"


def test_a_self_looping_symlink_is_reported(make_cfg, tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "5_things" / "loop.png").symlink_to("loop.png")
    (root / "3_more").symlink_to("3_more")  # a folder-like name: not an image, still not silently dropped
    message = rejected(make_cfg(f"data.train_dir={root}"))
    assert str(root / "5_things" / "loop.png") in message and "loops back on itself" in message
    assert str(root / "3_more") in message


def test_a_self_looping_image_link_is_skipped_and_named_when_asked(make_cfg, tmp_path):
    from sweeper.config.validate import validate

    root = image_folder(tmp_path / "data")
    (root / "5_things" / "loop.png").symlink_to("loop.png")
    validated = validate(make_cfg(f"data.train_dir={root}", "data.on_bad_image=skip"))
    assert [(p.name, "loops" in why) for p, why in validated.dataset.skipped] == [("loop.png", True)]
