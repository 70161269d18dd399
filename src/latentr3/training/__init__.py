"""Training recipes: SFT (stage 1) and latent GRPO (stage 2)."""
