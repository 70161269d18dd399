"""Where the authors' code is: shared by the scripts of this directory."""
import os


def r3_source() -> str:
    """src/grpo_attention_tuning of the authors' checkout ($R3_DIR: github.com/xuwenxinedu/R3 at 8c390b5)."""
    root = os.environ.get("R3_DIR")
    src = os.path.join(root or "", "src", "grpo_attention_tuning")
    if not root or not os.path.isfile(os.path.join(src, "train_noise_grpo.py")):
        raise SystemExit(f"R3_DIR={root!r}: not a checkout of github.com/xuwenxinedu/R3 (no {src}/train_noise_grpo.py)")
    return src
