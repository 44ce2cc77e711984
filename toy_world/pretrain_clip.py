"""Pre-train a tiny CLIP on the toy world, so evaluation of the embedded model has a real judge.

``python -m toy_world.pretrain_clip --out DIR`` trains a ~0.9 M-parameter ``CLIPModel`` (a
4-layer ViT with 8 px patches on 64 px images, a 3-layer text transformer over
``world_tokenizer()``) with CLIP's symmetric contrastive loss on generated scenes of every shape,
the held-out one included, and writes a ``save_pretrained`` folder that ``ClipScorer`` and
``CLIPTextModel`` load.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"
(arXiv:2103.00020): symmetric InfoNCE over an in-batch similarity matrix with a learned
temperature, clipped at 100. Two additions make the ViT learn shapes several times sooner (2000 x
256 steps: 73 % zero-shot shape accuracy without them, 85 % with): a one-word counterfactual
caption per image as a hard negative, and every zero-shot prompt scored against every image.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

from evaluation.tiny_clip import _ImageProcessor
from toy_world.world import (
    COLOURS,
    PATTERNS,
    SHAPES,
    SIZES,
    Scene,
    article,
    render,
    scenes,
    sentence_caption,
    tag_caption,
    world_tokenizer,
)
from training.families.checked_loading import load_checked
from training.text.tokenizer import MAX_LENGTH

IMAGE_SIZE = 64
# 3000 x 512 = 1.5 M (image, caption) pairs: the fewest measured to reach >= 95 % zero-shot shape accuracy
# (98.4 % / 98.8 % for seeds 0 / 1 on an H100 in ~2 minutes; 1000 x 512 gave 58 %, 2000 x 256 gave 85 %).
# On one CPU thread a step takes seconds: train on a GPU.
DEFAULT_STEPS = 3000
DEFAULT_BATCH_SIZE = 512
DEFAULT_DEGRADE_SHARE = 0.5  # half of each batch blurred and noised like generated samples (``degrade``)
EVAL_SEED_OFFSET = 10_000  # eval scenes come from seed + 10_000; training uses seed itself
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 (Radford et al. 2021, sec. 2.5)

# Zero-shot prompts, one per class; training captions include these templates, so they are in-distribution.
SHAPE_PROMPT = "a {shape}"
COLOUR_PROMPT = "a {colour} shape"

# Scene fields a caption can pin down, in the order of the integer codes of ``_scene_codes``.
FIELDS = ("shape", "colour", "size", "background", "pattern")
_VOCAB = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "background": tuple(COLOURS), "pattern": PATTERNS}
_CODES = {field: {value: code for code, value in enumerate(values)} for field, values in _VOCAB.items()}


# --- model


def build_clip(
    seed: int = 0, width: int = 96, text_layers: int = 3, vision_layers: int = 4
) -> tuple[CLIPModel, CLIPProcessor]:
    """A seeded, untrained toy CLIP and its processor (defaults: ~0.9 M parameters, ~3.6 MB as fp32).

    Both towers are ``width`` wide with 4x MLPs; the text tower's hidden size is what a diffusion
    UNet using it as text encoder needs as ``cross_attention_dim``.
    """
    tokenizer = world_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,  # pooling reads the first EOS position
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=64)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(state)  # building the model must not shift the caller's RNG stream
    return model, build_processor(tokenizer)


def build_processor(tokenizer: CLIPTokenizer) -> CLIPProcessor:
    """The processor of ``evaluation.tiny_clip``: a 64 px image is passed through unresized, then normalised."""
    image_processor = _ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def text_encoder_from_clip(folder: str | Path) -> CLIPTextModel:
    """The text tower of a saved toy CLIP as a ``CLIPTextModel``, e.g. a diffusion model's text encoder.

    ``CLIPTextModel.from_pretrained(folder)`` works too, but reports every vision weight as
    unexpected; copying the tower loads cleanly.
    """
    clip = load_checked(CLIPModel, folder)
    if isinstance(clip.text_model, CLIPTextModel):  # transformers >= 5: the tower is a CLIPTextModel
        return clip.text_model.eval()
    text = CLIPTextModel(clip.config.text_config)  # pragma: no cover - transformers 4.x
    text.text_model.load_state_dict(clip.text_model.state_dict())
    return text.eval()


# --- captions


# Short prompts: (text of a scene and its "a blue"-style background, the fields the text states).
_SHORT_TEMPLATES: tuple[tuple[Callable[[Scene, str], str], tuple[str, ...]], ...] = (
    (lambda s, bg: SHAPE_PROMPT.format(shape=s.shape), ("shape",)),
    (lambda s, bg: COLOUR_PROMPT.format(colour=s.colour), ("colour",)),
    (lambda s, bg: f"a {s.colour} {s.shape}", ("colour", "shape")),
    (lambda s, bg: f"a {s.size} {s.shape}", ("size", "shape")),
    (lambda s, bg: f"a {s.size} {s.colour} {s.shape}", ("size", "colour", "shape")),
    (lambda s, bg: f"a {s.shape} on {bg} background", ("shape", "background")),
    (lambda s, bg: f"a {s.colour} {s.shape} on {bg} background", ("colour", "shape", "background")),
    (lambda s, bg: f"{bg} {s.pattern} background", ("background", "pattern")),
)


def sample_caption(scene: Scene, rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """A random caption of ``scene`` and the scene fields it states (what makes another scene match it).

    Half are full descriptions (sentence, tags in order or shuffled, as a tag-shuffling trainer
    feeds them); half are short prompts such as ``a red star``, so zero-shot and evaluation prompts
    are in-distribution. A missing pattern states nothing about it (a prompt without one matches
    every pattern).
    """
    full = ("shape", "colour", "size", "background") + (() if scene.pattern == "plain" else ("pattern",))
    bg = f"{article(scene.background)} {scene.background}"
    roll = rng.random()
    if roll < 0.3:
        return sentence_caption(scene), full
    if roll < 0.5:
        tags = tag_caption(scene).split(", ")
        if rng.random() < 0.5:
            rng.shuffle(tags)
        return ", ".join(tags), full
    text_of, fields = _SHORT_TEMPLATES[rng.randrange(len(_SHORT_TEMPLATES))]
    return text_of(scene, bg), fields


def counterfactual(scene: Scene, stated: tuple[str, ...], rng: random.Random) -> Scene:
    """``scene`` with one of the ``stated`` fields changed (the shape half the time when stated).

    Its caption is a hard negative for the image (NegCLIP; Yuksekgonul et al. 2023, "When and Why
    Vision-Language Models Behave like Bags-of-Words", arXiv:2210.01936): in a batch, colour and
    background alone tell most full captions apart, so without it the shape is learned slowly.
    A pattern changed to plain drops the word from full captions, making the "negative" true of
    the image (about 1 % of them); ``positive_mask`` then counts it as a positive, as it should.
    """
    field = "shape" if "shape" in stated and rng.random() < 0.5 else rng.choice(stated)
    taken = {scene.colour, scene.background} if field in ("colour", "background") else {getattr(scene, field)}
    return replace(scene, **{field: rng.choice([v for v in _VOCAB[field] if v not in taken])})


def _scene_codes(batch: Sequence[Scene]) -> np.ndarray:
    """(len(batch), len(FIELDS)) integer codes of each scene's fields, for vectorised matching."""
    return np.array([[_CODES[f][getattr(s, f)] for f in FIELDS] for s in batch], dtype=np.int64)


def positive_mask(
    images: Sequence[Scene], described: Sequence[Scene], stated: Sequence[tuple[str, ...]]
) -> torch.Tensor:
    """``mask[i, j]``: caption ``j`` (of scene ``described[j]``, stating ``stated[j]``) is true of ``images[i]``.

    Short prompts like ``a circle`` describe many images of a batch; counting those as negatives
    (plain InfoNCE) would train the model to deny true captions, so every true pair is a positive.
    """
    image_codes, caption_codes = _scene_codes(images), _scene_codes(described)
    states = np.array([[f in fields for f in FIELDS] for fields in stated], dtype=bool).reshape(-1, len(FIELDS))
    mask = np.ones((len(images), len(described)), dtype=bool)
    for f in range(len(FIELDS)):  # a caption is true of an image if every field it states agrees
        mask &= (image_codes[:, f, None] == caption_codes[None, :, f]) | ~states[None, :, f]
    return torch.from_numpy(mask)


def contrastive_loss(logits_per_image: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, fig. 3) with several positives per row and column.

    Each direction is a cross-entropy against the uniform distribution over the true partners;
    with one positive per row (the diagonal) it is exactly CLIP's loss. Captions true of no image
    (hard negatives) only take part as image-to-text negatives.
    """
    positives = positives.to(logits_per_image.device, torch.float32)
    logits = logits_per_image.float()
    row_targets = positives / positives.sum(1, keepdim=True).clamp(min=1)
    image_to_text = -(row_targets * logits.log_softmax(1)).sum(1).mean()
    has_image = positives.sum(0) > 0
    column_targets = positives[:, has_image] / positives[:, has_image].sum(0, keepdim=True)
    text_to_image = -(column_targets * logits[:, has_image].log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def batch_captions(
    batch: Sequence[Scene], rng: random.Random, hard_negatives: bool = True
) -> tuple[list[str], torch.Tensor]:
    """One caption per scene, then (optionally) one counterfactual caption per scene, and their positive mask.

    A counterfactual reuses its scene's caption template (same seed), so it differs in one word only.
    """
    seeds = [rng.random() for _ in batch]
    captions = [sample_caption(s, random.Random(k)) for s, k in zip(batch, seeds, strict=True)]
    described = list(batch)
    if hard_negatives:
        altered = [counterfactual(s, fields, rng) for s, (_, fields) in zip(batch, captions, strict=True)]
        captions += [sample_caption(s, random.Random(k)) for s, k in zip(altered, seeds, strict=True)]
        described += altered
    mask = positive_mask(batch, described, [fields for _, fields in captions])
    return [text for text, _ in captions], mask


# Every zero-shot prompt, scored against every image of each batch (``class_prompt_loss``).
CLASS_PROMPTS = [SHAPE_PROMPT.format(shape=s) for s in SHAPES] + [COLOUR_PROMPT.format(colour=c) for c in COLOURS]


def class_prompt_loss(logits: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Image-to-text cross-entropy against all shape prompts and all colour prompts (``CLASS_PROMPTS`` columns).

    Still a contrastive image-text loss, with the negatives chosen rather than sampled: every
    image meets every other shape's prompt in every step (as UniCL treats class names as texts;
    Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space", arXiv:2204.03610).
    ``shapes``/``colours`` are the indices of each image's shape in ``SHAPES`` and colour in ``COLOURS``.
    """
    logits = logits.float()
    shape_loss = F.cross_entropy(logits[:, : len(SHAPES)], shapes)
    colour_loss = F.cross_entropy(logits[:, len(SHAPES) :], colours)
    return (shape_loss + colour_loss) / 2


# --- data


def _render_chunk(chunk: Sequence[Scene]) -> np.ndarray:
    """(n, H, W, 3) uint8 renders; module-level so worker processes can run it."""
    return np.stack([np.asarray(render(scene, IMAGE_SIZE)) for scene in chunk])


def render_pool(seed: int, count: int, workers: int = 1) -> tuple[list[Scene], np.ndarray]:
    """``count`` training scenes of every shape (held-out ones included) and their images as uint8 NHWC.

    ``workers`` > 1 renders in forked processes (the images are the same: each is a pure function of its scene).
    """
    pool = scenes(seed, count, SHAPES)
    chunks = [pool[i : i + 512] for i in range(0, count, 512)]
    if workers > 1 and len(chunks) > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")  # workers inherit the world module; they only draw with PIL
        with ProcessPoolExecutor(workers, mp_context=context) as executor:
            parts = list(executor.map(_render_chunk, chunks))
    else:
        parts = [_render_chunk(chunk) for chunk in tqdm(chunks, desc="render", leave=False, mininterval=2)]
    return pool, np.concatenate(parts)


class Normaliser:
    """uint8 NHWC tensor -> the processor's normalised NCHW, on the device (the processor is per-image PIL code)."""

    def __init__(self, processor: CLIPProcessor, device: torch.device) -> None:
        image_processor = processor.image_processor
        self.mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)
        self.device = device

    def __call__(
        self, images: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        pixels = images.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if augment is not None:
            pixels = augment(pixels)
        return (pixels - self.mean) / self.std


class TokenCache:
    """Token ids per caption: the word tokenizer is pure Python and captions repeat a lot."""

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if missing:
            encoded = self.tokenizer(missing, truncation=True, max_length=MAX_LENGTH)["input_ids"]
            self.ids.update((c, np.array(ids, dtype=np.int64)) for c, ids in zip(missing, encoded, strict=True))
        rows = [self.ids[c] for c in captions]
        lengths = np.array([len(r) for r in rows])
        input_ids = np.full((len(rows), lengths.max()), self.tokenizer.pad_token_id, dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
        mask = (np.arange(lengths.max())[None, :] < lengths[:, None]).astype(np.int64)
        return torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)


class CaptionedBatches(torch.utils.data.IterableDataset):
    """Endless training batches from a rendered pool: images, captions (tokenised) and their positive mask.

    Each DataLoader worker draws from its own seeded streams, so a run is reproducible for a given
    number of workers; with workers, batches are built while the accelerator trains on the last.
    Images are flipped left-right at random (no caption mentions position).
    """

    def __init__(
        self,
        pool: Sequence[Scene],
        images: np.ndarray,
        tokenizer: CLIPTokenizer,
        *,
        seed: int,
        batch_size: int,
        hard_negatives: bool = True,
        class_prompts: bool = True,
    ) -> None:
        self.pool, self.images, self.tokenizer = pool, images, tokenizer
        self.seed, self.batch_size = seed, batch_size
        self.hard_negatives, self.class_prompts = hard_negatives, class_prompts

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        caption_rng = random.Random(f"captions-{self.seed}-{worker}")
        index_rng = np.random.default_rng([self.seed, worker])
        tokens = TokenCache(self.tokenizer)
        cpu = torch.device("cpu")
        while True:
            picked = index_rng.choice(len(self.pool), size=self.batch_size, replace=False)
            batch = [self.pool[i] for i in picked]
            captions, positives = batch_captions(batch, caption_rng, self.hard_negatives)
            input_ids, attention_mask = tokens(captions + CLASS_PROMPTS if self.class_prompts else captions, cpu)
            pixels = self.images[picked]
            flip = index_rng.random(self.batch_size) < 0.5
            pixels[flip] = pixels[flip, :, ::-1]
            yield {
                "pixels": torch.from_numpy(pixels),
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "positives": positives,
                "shapes": torch.tensor([_CODES["shape"][s.shape] for s in batch]),
                "colours": torch.tensor([_CODES["colour"][s.colour] for s in batch]),
            }


# --- evaluation


@torch.no_grad()
def zero_shot_predictions(
    model: CLIPModel,
    processor: CLIPProcessor,
    seed: int,
    count: int,
    device: str | torch.device,
    shapes: Sequence[str] = SHAPES,
) -> tuple[list[Scene], list[str], list[str]]:
    """Held-out scenes of ``seed`` and the shape and colour the model picks for each, zero-shot.

    Prompts: ``a {shape}`` among ``shapes`` (the world's, or those a CLIP made before the world grew
    was trained on), ``a {colour} shape`` among every colour. Images go through ``processor`` exactly
    as ``ClipScorer`` sends them.
    """
    shapes = list(shapes)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    evaluated = scenes(seed, count, shapes)
    colours = list(COLOURS)

    def text_embeds(prompts: list[str]) -> torch.Tensor:
        tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt").to(device)
        out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(model.text_projection(out.pooler_output).float(), dim=-1)

    shape_text = text_embeds([SHAPE_PROMPT.format(shape=s) for s in shapes])
    colour_text = text_embeds([COLOUR_PROMPT.format(colour=c) for c in colours])
    shape_picks: list[str] = []
    colour_picks: list[str] = []
    for start in range(0, count, 256):
        images = [render(s, IMAGE_SIZE) for s in evaluated[start : start + 256]]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        pooled = model.vision_model(pixel_values=pixels.to(model.dtype)).pooler_output
        image = F.normalize(model.visual_projection(pooled).float(), dim=-1)
        shape_picks += [shapes[i] for i in (image @ shape_text.T).argmax(1).tolist()]
        colour_picks += [colours[i] for i in (image @ colour_text.T).argmax(1).tolist()]
    model.train(was_training)
    return evaluated, shape_picks, colour_picks


def zero_shot_accuracy(
    model: CLIPModel,
    processor: CLIPProcessor,
    seed: int,
    count: int,
    device: str | torch.device,
    shapes: Sequence[str] = SHAPES,
) -> dict[str, float]:
    """Zero-shot shape and colour accuracy on ``count`` scenes of ``seed`` (chance: 1/len(shapes), 1/8)."""
    return _accuracies(*zero_shot_predictions(model, processor, seed, count, device, shapes))


def _accuracies(
    evaluated: Sequence[Scene], shape_picks: Sequence[str], colour_picks: Sequence[str]
) -> dict[str, float]:
    total = max(len(evaluated), 1)
    return {
        "shape_accuracy": sum(s.shape == p for s, p in zip(evaluated, shape_picks, strict=True)) / total,
        "colour_accuracy": sum(s.colour == p for s, p in zip(evaluated, colour_picks, strict=True)) / total,
    }


def per_shape_accuracy(evaluated: Sequence[Scene], shape_picks: Sequence[str]) -> dict[str, float]:
    """Zero-shot shape accuracy of each shape: a weak held-out shape would hide in the average."""
    result = {}
    present = {s.shape for s in evaluated}
    for shape in (s for s in SHAPES if s in present):
        picks = [p for s, p in zip(evaluated, shape_picks, strict=True) if s.shape == shape]
        result[shape] = sum(p == shape for p in picks) / max(len(picks), 1)
    return result


# --- training


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def degrade(pixels: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """``share`` of the images (NCHW in [0, 1]) blurred (Gaussian, sigma up to 1.2 px) and noised (std up to 0.04).

    The toy CLIP judges a small diffusion model's samples, whose edges are softer and whose flat
    areas are noisier than the renders'; trained on renders alone it took many generated hexagons
    for circles. Which images, how much blur and how much noise are drawn from ``generator``.
    """
    count, channels, height, width = pixels.shape
    device = pixels.device
    chosen = torch.rand(count, generator=generator, device=device) < share
    sigma = torch.rand(count, generator=generator, device=device) * 1.2 * chosen
    noise_std = torch.rand(count, generator=generator, device=device) * 0.04 * chosen
    offsets = torch.arange(-2, 3, device=device, dtype=pixels.dtype)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (count * channels, 5)
    flat = pixels.reshape(1, count * channels, height, width)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="reflect"), kernel[:, None, :, None], groups=count * channels)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=count * channels)
    blurred = flat.reshape(count, channels, height, width)
    noise = torch.randn(blurred.shape, generator=generator, device=device) * noise_std[:, None, None, None]
    return (blurred + noise).clamp(0.0, 1.0)


def batch_loss(
    model: CLIPModel,
    batch: dict[str, torch.Tensor],
    normalise: Normaliser,
    class_weight: float = 1.0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The training loss of one ``CaptionedBatches`` batch (already on the model's device).

    ``augment`` (e.g. ``degrade``) maps the NCHW [0, 1] images before normalisation.
    """
    n_captions = batch["positives"].shape[1]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=normalise(batch["pixels"], augment),
    )
    logits = out.logits_per_image
    loss = contrastive_loss(logits[:, :n_captions], batch["positives"])
    if class_weight:
        loss = loss + class_weight * class_prompt_loss(logits[:, n_captions:], batch["shapes"], batch["colours"])
    return loss


def train_clip(
    model: CLIPModel,
    processor: CLIPProcessor,
    *,
    seed: int = 0,
    steps: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    pool_size: int = 20_000,
    hard_negatives: bool = True,
    class_weight: float = 1.0,
    workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    degrade_share: float = 0.0,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps and return the loss of every step.

    Images come from a pre-rendered pool of ``pool_size`` scenes of seed ``seed`` (rendering is
    slower than a step); each batch draws a fresh caption per image, so the pool never repeats an
    (image, caption) pair for long. ``workers`` > 0 builds batches in DataLoader processes.
    ``degrade_share`` of each batch's images is blurred and noised (``degrade``).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    pool, images = render_pool(seed, pool_size, workers=os.cpu_count() or 1)
    batches = CaptionedBatches(
        pool,
        images,
        processor.tokenizer,
        seed=seed,
        batch_size=batch_size,
        hard_negatives=hard_negatives,
        class_prompts=bool(class_weight),
    )
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    normalise = Normaliser(processor, device)
    augment_generator = torch.Generator(device).manual_seed(seed + 1)
    augment = (lambda pixels: degrade(pixels, degrade_share, augment_generator)) if degrade_share > 0 else None

    model.to(device).train()
    # Decay only matrices: norms, biases, the temperature and position tables keep their scale.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),  # CLIP's beta2 for stability with large contrastive batches
        fused=device.type == "cuda",
    )
    warmup_steps = max(1, round(warmup * steps))

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    losses: list[torch.Tensor] = []  # kept on the device: reading each loss would stall the GPU every step
    bar = tqdm(total=steps, desc="pretrain clip", unit="step", disable=not progress, mininterval=1)
    for step, batch in zip(range(steps), loader, strict=False):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast:
            loss = batch_loss(model, batch, normalise, class_weight, augment)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss.detach())
        bar.update()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[-1].item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    model.eval()
    return torch.stack(losses).float().tolist() if losses else []


# --- save


def save_atomically(model: CLIPModel, processor: CLIPProcessor, metrics: dict, out: Path) -> None:
    """Write the folder under a temporary name beside ``out`` and rename it: a crash leaves no half folder.

    The model is saved in fp32 from the CPU (it is moved there).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the shipped folder private
        model.to("cpu").float().save_pretrained(tmp)  # safetensors is the default format
        processor.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        old = None
        if out.exists():  # moved aside, not deleted first, so a failed rename keeps the old model
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="training seed; evaluation uses seed + 10000")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pool-size", type=int, default=20_000, help="pre-rendered training images")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--workers", type=int, default=-1, help="batch-building processes; -1: up to 4 on CUDA, 0 on the CPU"
    )
    parser.add_argument("--eval-count", type=int, default=2000)
    parser.add_argument(
        "--degrade-share", type=float, default=DEFAULT_DEGRADE_SHARE, help="share of images blurred and noised"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.seed < EVAL_SEED_OFFSET:
        parser.error(f"--seed must be in [0, {EVAL_SEED_OFFSET}) so training and evaluation scenes differ")
    if args.batch_size > args.pool_size:
        parser.error("--batch-size must not exceed --pool-size")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Train, evaluate zero-shot on unseen scenes, save; return the metrics written to ``metrics.json``."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    # On a GPU the Python batch building is the bottleneck, so it runs beside the training step.
    workers = args.workers if args.workers >= 0 else (min(4, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    model, processor = build_clip(args.seed)
    losses = train_clip(
        model,
        processor,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        pool_size=args.pool_size,
        workers=workers,
        device=device,
        degrade_share=args.degrade_share,
    )
    evaluated, shape_picks, colour_picks = zero_shot_predictions(
        model, processor, EVAL_SEED_OFFSET + args.seed, args.eval_count, device
    )
    metrics = {
        **_accuracies(evaluated, shape_picks, colour_picks),
        "per_shape_accuracy": per_shape_accuracy(evaluated, shape_picks),
        "shapes": list(SHAPES),
        "shape_prompt": SHAPE_PROMPT,
        "colour_prompt": COLOUR_PROMPT,
        "eval_seed": EVAL_SEED_OFFSET + args.seed,
        "eval_count": args.eval_count,
        "final_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "pool_size": args.pool_size,
        "degrade_share": args.degrade_share,
        "workers": workers,
        "seed": args.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
        "command": [sys.executable, "-m", "toy_world.pretrain_clip", *(sys.argv[1:] if argv is None else argv)],
        "torch_version": torch.__version__,
    }
    save_atomically(model, processor, metrics, args.out)
    print(json.dumps({k: metrics[k] for k in ("shape_accuracy", "colour_accuracy", "steps", "wall_seconds")}))
    return metrics


if __name__ == "__main__":
    main()
