"""The toy world: reproducible scenes and images, captions that say what is drawn, one token per word."""

from __future__ import annotations

import random

import numpy as np
import pytest

from toy_world.world import (
    COLOURS,
    FILLED_SHAPES,
    HELD_OUT_SHAPE,
    HELD_OUT_SHAPES,
    MARGIN,
    MAX_ROTATION,
    PATTERNS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    WORLD_WORDS,
    Scene,
    pattern_colour,
    random_scene,
    render,
    scenes,
    sentence_caption,
    tag_caption,
    world_tokenizer,
)


def _words(caption: str) -> list[str]:
    return caption.replace(",", " ").split()


def test_same_seed_gives_same_scenes_and_identical_image_bytes() -> None:
    first, second = scenes(7, 20), scenes(7, 20)
    assert first == second
    assert [render(s).tobytes() for s in first] == [render(s).tobytes() for s in second]


def test_different_seeds_give_different_scenes_and_images() -> None:
    first, second = scenes(1, 20), scenes(2, 20)
    assert first != second
    assert [render(s).tobytes() for s in first] != [render(s).tobytes() for s in second]


def test_scenes_cover_every_value_and_keep_background_apart_from_shape() -> None:
    drawn = scenes(0, 400)
    assert {s.shape for s in drawn} == set(SHAPES)
    assert {s.colour for s in drawn} == set(COLOURS)
    assert {s.size for s in drawn} == set(SIZES)
    assert {s.pattern for s in drawn} == set(PATTERNS)
    assert all(s.background != s.colour for s in drawn)
    assert all(0 < s.x < 1 and 0 < s.y < 1 for s in drawn)


def test_held_out_shape_never_drawn_when_excluded() -> None:
    seen = [s for s in SHAPES if s != HELD_OUT_SHAPE]
    assert {s.shape for s in scenes(3, 500, shapes=seen)} == set(seen)
    rng = random.Random(0)
    assert all(random_scene(rng, seen).shape != HELD_OUT_SHAPE for _ in range(200))


def test_unknown_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown shapes"):
        scenes(0, 3, shapes=["circle", "blob"])


@pytest.mark.parametrize("scene", scenes(11, 60), ids=lambda s: f"{s.size}-{s.colour}-{s.shape}-{s.pattern}")
def test_captions_and_pixels_match_the_scene(scene: Scene) -> None:
    sentence, tags = sentence_caption(scene), tag_caption(scene)
    for caption in (sentence, tags):
        words = _words(caption)
        assert {scene.shape, scene.colour, scene.background, scene.size} <= set(words)
        assert (scene.pattern in words) == (scene.pattern != "plain")
    assert sentence.startswith(f"a {scene.size} {scene.colour} {scene.shape} on ")
    assert tags.startswith(f"{scene.colour} {scene.shape}, {scene.background} background")

    pixels = np.asarray(render(scene), dtype=np.int64)
    assert pixels.shape == (64, 64, 3)
    if scene.shape in FILLED_SHAPES:
        centre = pixels[int(scene.y * 64), int(scene.x * 64)]
        assert np.abs(centre - COLOURS[scene.colour]).max() <= 2
    # Corners lie outside every shape: each pixel is the background, its pattern shade, or a blend of the two.
    background = np.array(COLOURS[scene.background])
    shade = np.array(pattern_colour(scene.background))
    for corner in (pixels[:3, :3], pixels[:3, -3:], pixels[-3:, :3], pixels[-3:, -3:]):
        for pixel in corner.reshape(-1, 3):
            step = shade - background
            t = np.clip((pixel - background) @ step / max(step @ step, 1), 0, 1)  # nearest blend of the two
            assert np.abs(pixel - (background + t * step)).max() <= 2


def test_shapes_stay_inside_the_image_and_small_is_at_least_14_px() -> None:
    for shape in SHAPES:
        for size in SIZES:
            low = SIZE_RADIUS[size] + MARGIN  # the extreme centres random_scene may pick
            for x, y in ((low, low), (1 - low, 1 - low), (low, 1 - low)):
                scene = Scene(shape, "red", size, x, y, "blue", "plain", MAX_ROTATION)
                pixels = np.asarray(render(scene), dtype=np.int64)
                border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
                assert (border == COLOURS["blue"]).all(), (shape, size, x, y)
        small = Scene(shape, "white", "small", 0.5, 0.5, "black", "plain", 0.0)
        drawn = np.asarray(render(small), dtype=np.int64).sum(-1) > 3 * 128
        columns, rows = np.flatnonzero(drawn.any(0)), np.flatnonzero(drawn.any(1))
        assert max(columns[-1] - columns[0], rows[-1] - rows[0]) + 1 >= 14, shape


def test_every_caption_word_is_one_token_of_the_world_tokenizer() -> None:
    tokenizer = world_tokenizer()
    words = set(WORLD_WORDS)
    for scene in scenes(5, 200):
        words |= set(_words(sentence_caption(scene))) | set(_words(tag_caption(scene)))
    assert words <= set(WORLD_WORDS)
    for word in sorted(words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, ids)
    # A whole caption is one token per word, plus one per comma.
    caption = tag_caption(scenes(5, 1)[0])
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(_words(caption)) + caption.count(",")


def test_held_out_shapes_are_world_shapes_and_the_moon_is_bitten() -> None:
    assert set(HELD_OUT_SHAPES) <= set(SHAPES) and HELD_OUT_SHAPE == HELD_OUT_SHAPES[0] == "star"
    moon = Scene("moon", "red", "large", 0.5, 0.5, "blue", "plain", 0.0)  # bite towards +x
    pixels = np.asarray(render(moon), dtype=np.int64)
    radius = SIZE_RADIUS["large"] * 64
    assert np.abs(pixels[32, 32] - COLOURS["blue"]).max() <= 2  # the centre lies in the bite
    assert np.abs(pixels[32, round(32 - 0.7 * radius)] - COLOURS["red"]).max() <= 2  # the crescent's thick side
    drawn = {render(Scene(shape, "red", "large", 0.5, 0.5, "blue", "plain", 0.0)).tobytes() for shape in SHAPES}
    assert len(drawn) == len(SHAPES)  # every shape draws differently
