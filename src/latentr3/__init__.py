"""latentr3: LLM-based sequential recommendation with reinforced latent reasoning (LatentR3)."""

__version__ = "0.1.0"
