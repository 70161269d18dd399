"""Non-LLM baselines that read the same split files (SASRec)."""
