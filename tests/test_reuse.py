"""Runs in one process share the base model, and no run ever sees another run's LoRA."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from sweeper.run import task
from sweeper.run.setting import run


def test_runs_share_the_base_model_and_start_from_fresh_lora(make_cfg):
    def trial(name: str, dim: int):
        cfg = make_cfg("train.max_steps=3", f"network.dim={dim}", f"output.name={name}")
        return run(cfg, show_progress=False)

    loads_before = task._worker.model_loads
    first = trial("a", 8)
    base = task._worker.base_model(make_cfg().model)
    between = trial("b", 4)
    again = trial("c", 8)

    assert task._worker.model_loads - loads_before <= 1, "the base model is loaded once per process"
    assert task._worker.base_model(make_cfg().model) is base
    assert not getattr(base.denoiser, "peft_config", {}), "no adapter stays on the shared model"

    a, b, c = (load_file(r.lora_path) for r in (first, between, again))
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a), (
        "the third run (same config as the first) must start from fresh LoRA weights, not the second's"
    )
    key = next(k for k in b if k.endswith("lora_down.weight"))
    assert b[key].shape[0] == 4 and a[key].shape[0] == 8
    assert first.metrics["clip_score_baseline"] == again.metrics["clip_score_baseline"]
