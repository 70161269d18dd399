"""Stand-in for the authors' `noisy_layer` module, which model.py imports but the public repository
(xuwenxinedu/R3 @ 8c390b5) does not contain.  `replace_with_noisy_linear` is only referenced in
commented-out code of the RL stage, so it is never called; calling it here fails loudly."""


def replace_with_noisy_linear(*args, **kwargs):
    raise NotImplementedError("noisy_layer.py is not in the public R3 repository")
