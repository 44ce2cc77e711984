"""The values ``train.flow`` may take: checked at startup without loading diffusers."""

from __future__ import annotations

from typing import Any

# train.flow.weighting_scheme: how σ is drawn (logit_normal, mode) or the loss weighted (sigma_sqrt,
# cosmap); none = uniform σ, equal weights
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def flow_problems(flow_cfg: Any) -> list[str]:
    """Every problem of ``train.flow``, naming the key and the fix."""
    problems = []
    if flow_cfg.weighting_scheme not in WEIGHTING_SCHEMES:
        problems.append(
            f"train.flow.weighting_scheme: unknown '{flow_cfg.weighting_scheme}'; use one of "
            f"{', '.join(WEIGHTING_SCHEMES)} (logit_normal is the SD3 paper's)"
        )
    if flow_cfg.logit_std <= 0:
        problems.append(f"train.flow.logit_std must be > 0 (got {flow_cfg.logit_std})")
    if flow_cfg.shift is not None and flow_cfg.shift <= 0:
        problems.append(f"train.flow.shift must be > 0 (got {flow_cfg.shift}); null = the model's own")
    return problems
