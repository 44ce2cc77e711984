"""What is computed once and reused: cache folders, latents, text embeddings."""
