"""A procedural toy world of shapes, and a tiny CLIP trained on it, so the embedded model can really learn."""
