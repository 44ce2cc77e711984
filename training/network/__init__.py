"""The LoRA: peft adapters, the kohya-named file and its metadata."""
