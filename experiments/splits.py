"""Which text each decision may see.

- **Calibration**: the first tokens of the model's ``calib.txt``. Every threshold algorithm fits
  its schedule on them.
- **Development**: the last ``DEV_TOKENS`` tokens of ``calib.txt``, never calibrated on. Method
  selection (which variant of an algorithm, which default) is scored here and only here. On
  ``rwkv_tiny`` the calibration side is *Julius Caesar* (its first 38,882 tokens) and the
  development split the last 32,768 tokens, all inside *A Midsummer Night's Dream*: a whole work
  that neither the calibration nor the final table sees.
- **Evaluation**: ``eval.txt`` (other works). Only the final comparison scores it, and nothing is
  chosen from those scores.

:func:`calib_and_dev` cuts the two sides of ``calib.txt`` and refuses a calibration set that
would reach into the development split.
"""
from __future__ import annotations

import torch

__all__ = ["DEV_TOKENS", "calib_and_dev"]

DEV_TOKENS = 32768


def calib_and_dev(ids: torch.Tensor, n_seq: int, seq_len: int, dev_tokens: int = DEV_TOKENS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration [n_seq, seq_len], development stream [dev_tokens])`` from the token ids of
    ``calib.txt``: calibration from the start, development from the end, disjoint."""
    ids = torch.as_tensor(ids).reshape(-1)
    need = n_seq * seq_len
    if need + dev_tokens > ids.numel():
        raise ValueError(f"calib.txt has {ids.numel()} tokens: {n_seq} x {seq_len} calibration tokens and "
                         f"{dev_tokens} development tokens do not fit without overlapping; use fewer")
    return ids[:need].reshape(n_seq, seq_len), ids[ids.numel() - dev_tokens:]
