"""Hydra's discovery hook for lora-sweeper; the logic lives in ``sweeper.search``."""
