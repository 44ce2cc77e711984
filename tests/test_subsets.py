"""data.subsets: several image folders, each with its own repeats, caption extension, keep_tokens and class tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from sweeper.config.schema import DataConfig, SubsetConfig
from sweeper.config.validate import ConfigError, validate
from sweeper.run.fingerprint import dataset_fingerprint
from sweeper.tracking.tracker import NullTracker
from training.data.missing_captions import class_tokens_notice, missing_captions_table
from training.data.scan import scan_folders
from training.families.loading import load_base_model
from training.loop import Trainer

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "10_star"


def images(folder: Path, names: list[str], captions: dict[str, str] | None = None, extension: str = ".txt") -> Path:
    """``folder`` with one small image per name and the given captions (``name -> text``) beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (64, 64), (40 * index % 256, 90, 160)).save(folder / f"{name}.png")
    for name, text in (captions or {}).items():
        (folder / f"{name}{extension}").write_text(text)
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    outfits = {"o1": "chara, red dress", "o2": "chara, coat"}
    found = {
        # captions as .txt; one image has none
        "portraits": images(tmp_path / "portraits", ["p1", "p2", "p3"], {"p1": "chara, smile", "p2": "chara, hat"}),
        # captions as .caption, beside a .txt that must not be read
        "outfits": images(tmp_path / "outfits", ["o1", "o2"], outfits, ".caption"),
        "reg": images(tmp_path / "reg", ["r1", "r2"]),
    }
    (found["outfits"] / "o1.txt").write_text("wrong file")
    return found


def make_subsets(folders: dict[str, Path]) -> list[str]:
    return [
        "data.train_dir=null",
        "data.caption_extension=.txt",
        "data.keep_tokens=1",
        "data.subsets=["
        f"{{dir: '{folders['portraits']}', repeats: 10, keep_tokens: 2, class_tokens: 'chara girl'}},"
        f"{{dir: '{folders['outfits']}', repeats: 3, caption_extension: .caption}},"
        f"{{dir: '{folders['reg']}', is_reg: true, class_tokens: girl}}]",
    ]


def test_each_folder_keeps_its_repeats_captions_and_class_tokens(make_cfg, folders):
    cfg = make_cfg(*make_subsets(folders))
    validated = validate(cfg)

    found = {r.path.name: (r.caption, r.repeats, r.keep_tokens, r.is_reg) for r in validated.dataset.records}
    assert found == {
        "p1.png": ("chara, smile", 10, 2, False),
        "p2.png": ("chara, hat", 10, 2, False),
        "p3.png": ("chara girl", 10, 2, False),  # no caption file: the folder's class tokens
        "o1.png": ("chara, red dress", 3, None, False),  # .caption read, the .txt beside it ignored
        "o2.png": ("chara, coat", 3, None, False),  # None: data.keep_tokens applies
    }
    assert validated.dataset.num_samples == 3 * 10 + 2 * 3
    assert validated.dataset.uncaptioned == [], "captioned by class tokens, not a missing caption"
    # ... and said at startup and in the run's data/missing_captions.tsv (as sd-scripts captions them)
    assert [u.path.name for u in validated.dataset.by_class_tokens] == ["p3.png"]
    notice = class_tokens_notice(validated.dataset)
    assert notice.startswith("1 image(s) of data.subsets") and "'chara girl'" in notice and "p3.png" in notice
    assert f"{folders['portraits'] / 'p3.png'}\tchara girl" in missing_captions_table([validated.dataset])
    regularisation = {r.path.name: (r.caption, r.repeats) for r in validated.regularisation.records}
    assert regularisation == {"r1.png": ("girl", 1), "r2.png": ("girl", 1)}


def test_the_data_fingerprint_holds_each_folders_own_caption_files(make_cfg, folders):
    """What reproduce compares: a subset's .caption files are fingerprinted, the stray .txt is not."""
    cfg = make_cfg(*make_subsets(folders))
    fingerprint = dataset_fingerprint(validate(cfg).dataset.records, cfg.data.caption_extension)
    names = {Path(name).name for name in fingerprint}
    assert {"o1.caption", "o2.caption", "p1.txt", "p2.txt"} <= names
    assert "o1.txt" not in names


def test_train_dir_and_subsets_are_trained_together(make_cfg, folders):
    cfg = make_cfg(f"data.subsets=[{{dir: '{folders['outfits']}', repeats: 2, caption_extension: .caption}}]")
    records = validate(cfg).dataset.records  # data.train_dir is still the bundled sample
    assert sorted({(r.path.parent.name, r.repeats) for r in records}) == [("10_star", 10), ("outfits", 2)]
    assert len(records) == 16 + 2


def test_a_subset_folder_in_kohya_layout_multiplies_its_repeats(tmp_path):
    root = tmp_path / "chara"
    images(root, ["direct"], {"direct": "a"})
    images(root / "5_closeups", ["close"], {"close": "b"})
    data = DataConfig(subsets=[SubsetConfig(dir=str(root), repeats=2)])
    assert {r.path.name: r.repeats for r in scan_folders(data).records} == {"direct.png": 2, "close.png": 10}
    assert scan_folders(data, reg=True) is None


def test_a_subset_without_class_tokens_leaves_missing_captions_to_the_policy(make_cfg, folders):
    subset = f"data.subsets=[{{dir: '{folders['portraits']}'}}]"
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("data.train_dir=null", subset))  # data.missing_captions=error by default
    assert "p3.png" in str(error.value)
    records = validate(make_cfg("data.train_dir=null", subset, "data.missing_captions=warn")).dataset.records
    assert {r.path.name: r.caption for r in records}["p3.png"] == ""


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{dir: /no/such/folder}", "data.subsets[0].dir: folder '/no/such/folder' does not exist"),
        ("{repeats: 2}", "data.subsets[0].dir: not set"),
        ("{dir: FOLDER, repeats: 0}", "data.subsets[0].repeats must be >= 1"),
        ("{dir: FOLDER, keep_tokens: -1}", "data.subsets[0].keep_tokens must be >= 0"),
        ("{dir: FOLDER, caption_extension: txt}", "must start with a dot"),
    ],
)
def test_bad_subsets_are_reported_naming_the_entry(make_cfg, folders, entry, message):
    entry = entry.replace("FOLDER", f"'{folders['outfits']}'")
    with pytest.raises(ConfigError) as error:
        validate(make_cfg("data.train_dir=null", f"data.subsets=[{entry}]", "data.missing_captions=warn"))
    assert message in str(error.value)


def test_training_keeps_each_folders_own_tags_in_place(make_cfg, tmp_path):
    """Shuffled tags: the folder with keep_tokens=2 always starts with its two tags, the other does not."""
    tags = {name: ", ".join(f"{name} {i}" for i in range(5)) for name in ("kept", "free")}
    for name in tags:
        folder = tmp_path / name
        folder.mkdir()
        for image in sorted(SAMPLE.glob("*.png"))[:4]:
            shutil.copy(image, folder / image.name)
            (folder / image.with_suffix(".txt").name).write_text(tags[name])
    cfg = make_cfg(
        "data.train_dir=null",
        f"data.subsets=[{{dir: '{tmp_path / 'kept'}', keep_tokens: 2}}, {{dir: '{tmp_path / 'free'}'}}]",
        "data.shuffle_tags=true",
        "data.keep_tokens=0",
        "network.train_text_encoder=false",  # a frozen text encoder: each caption used is cached, so it can be read
        "train.max_steps=12",
    )
    records = validate(cfg).dataset.records
    trainer = Trainer(cfg, load_base_model(cfg.model), records, NullTracker())
    trainer.fit(show_progress=False)

    used = list(trainer.text_cache._rows)
    kept = [c for c in used if c.startswith("kept") or ", kept" in c]
    free = [c for c in used if c.startswith("free") or ", free" in c]
    assert kept and free
    assert all(c.startswith("kept 0, kept 1, ") for c in kept)
    assert any(not c.startswith("free 0, free 1, ") for c in free), "keep_tokens=0 there: its tags move"
