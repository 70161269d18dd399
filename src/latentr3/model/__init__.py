"""LatentRATT, the LatentR3 model around a backbone LLM, and backbone loading."""
