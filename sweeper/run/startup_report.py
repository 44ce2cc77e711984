"""What a run prints and logs about its data and sizes at startup, once the config has passed.

Warnings, not errors: images trained without a caption file (``data.missing_captions`` warn or
class_tokens), the eval prompts when they were taken from the captions, which concept ``concept_acc``
counts (or why it is off), the aspect-ratio buckets in use, and a resolution far above the model's or
the images'. Each is printed and kept in the run.
"""

from __future__ import annotations

from typing import Any

from sweeper.config.eval_concept import choose_concept
from training.data.buckets import bucket_summary, generate_buckets, resolve_bucket_settings
from training.data.dataset import oriented_size
from training.data.missing_captions import class_tokens_notice, missing_captions_table, missing_captions_warning
from training.data.resolution import resolution_warnings
from training.families import family_of
from training.families.embedded import embedded_model_note


def report_data(tracker: Any, cfg: Any, validated: Any) -> None:
    """Images without captions (``data/missing_captions.tsv``) and the eval prompts (``eval/prompts.txt``)."""
    scans = [
        (key, scan)
        for key, scan in (
            ("data.train_dir", validated.dataset),
            ("data.reg_dir", validated.regularisation),
            ("data.val_dir", validated.held_out),
        )
        if scan is not None and (scan.uncaptioned or scan.by_class_tokens)
    ]
    for key, scan in scans:
        if warning := missing_captions_warning(scan, cfg.data.missing_captions, cfg.data.caption_extension, key):
            print(warning)
        if notice := class_tokens_notice(scan):
            print(notice)
    if scans:
        tracker.log_text(missing_captions_table([scan for _, scan in scans]), "data/missing_captions.tsv")
        tracker.set_tags({"data.uncaptioned_images": str(sum(len(scan.uncaptioned) for _, scan in scans))})
        if by_class_tokens := sum(len(scan.by_class_tokens) for _, scan in scans):
            tracker.set_tags({"data.class_token_captions": str(by_class_tokens)})
    chosen = validated.eval_prompts
    if chosen.source == "your captions":
        listed = "; ".join(chosen.prompts)
        print(f"Eval prompts (from your captions, picked with eval.test_seed={cfg.eval.test_seed}): {listed}")
    tracker.set_tags({"eval.prompts_source": chosen.source})
    tracker.log_text("\n".join(chosen.prompts) + "\n", "eval/prompts.txt")
    report_concept(tracker, cfg)
    report_model(tracker, cfg)


def model_note(cfg: Any) -> str | None:
    """What ``model=tiny`` / ``model=toy`` is (None for a real model): the tiny one's scores mean nothing."""
    return embedded_model_note(cfg.model.source, family_of(cfg.model.kind or "sd1").label)


def scores_note(cfg: Any) -> str | None:
    """The line under a run's scores, where they mean nothing (the random tiny model)."""
    return f"model=tiny is {model_note(cfg)}" if cfg.model.source == "tiny" else None


def report_model(tracker: Any, cfg: Any) -> None:
    """Tag ``model.note`` on runs of an embedded model; print it for the random tiny one, whose scores look broken."""
    if note := model_note(cfg):
        tracker.set_tags({"model.note": note})
        if scores := scores_note(cfg):
            print(f"note: {scores}")


def report_concept(tracker: Any, cfg: Any) -> None:
    """Which concept ``concept_acc`` counts (tag ``eval.concept``), or why it is off (printed on the toy model,
    where a user expects the metric)."""
    concept = choose_concept(cfg)
    tracker.set_tags({"eval.concept": concept.tag})
    if not concept.enabled and cfg.model.source == "toy":
        print(f"concept_acc is off: {concept.why}")


def report_sizes(tracker: Any, cfg: Any, trainer: Any, native: int) -> None:
    """The buckets in use (with ``bucket.enabled``) and warnings about the training resolution."""
    if cfg.bucket.enabled:
        resolution, min_side, max_side, step = resolve_bucket_settings(cfg.bucket, trainer.resolution)
        available = None if cfg.bucket.no_upscale else len(generate_buckets(resolution, min_side, max_side, step))
        summary = bucket_summary(trainer.dataset.record_buckets, available)
        print(f"Buckets (resolution {resolution}, step {step}): {summary}")
    training = dict.fromkeys(r.path for r in trainer.dataset.records if not r.is_reg)
    warnings = resolution_warnings(trainer.resolution, native, [oriented_size(path) for path in training])
    for warning in warnings:
        print(warning)
    if warnings:
        tracker.set_tags({"warning.resolution": "\n".join(warnings)})
