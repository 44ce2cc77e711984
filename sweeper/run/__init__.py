"""One run: a setting (setting.py: one seed, or K replicates in replicates.py) trained, evaluated,
saved and recorded by the task's stages (task.py), with what it prints at startup, what it depends
on besides its config (fingerprint.py), which process owns it, and how SIGTERM ends it."""
