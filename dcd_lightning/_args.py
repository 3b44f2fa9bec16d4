"""Argument types shared by the command-line tools (argparse reports their errors as usage errors)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of 1 or more: an image side, a count, a batch size."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; expected 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; expected 1 or more")
    return value
