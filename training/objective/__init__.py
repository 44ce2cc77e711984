"""The training objective, owned by the model family: DDPM (SD1/SD2/SDXL) or flow matching (SD3, FLUX)."""
