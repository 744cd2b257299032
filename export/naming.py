"""Model names: the one rule both the exporter and the server rely on to keep paths inside the repository."""

from __future__ import annotations

import re

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
MAX_NAME_LENGTH = 128
_NAME = re.compile(MODEL_NAME_PATTERN)


class InvalidNameError(ValueError):
    """A model (or serving holder) name that could escape the repository or is not portable."""


def validate_model_name(name: str, what: str = "model name") -> str:
    """Return `name` unchanged if it is a valid model name, else raise InvalidNameError saying why.

    Valid: lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, at most
    128 characters, no '..'. So a name is always exactly one path component below the repository root.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, got {type(name).__name__}")
    problem = None
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"it is longer than {MAX_NAME_LENGTH} characters"
    elif "/" in name or "\\" in name:
        problem = "it contains a path separator"
    elif ".." in name:
        problem = "it contains '..'"
    elif not _NAME.fullmatch(name):  # fullmatch: "$" alone would accept a trailing newline
        problem = "it has characters other than a-z, 0-9, '.', '_', '-' or does not start with a letter or digit"
    if problem:
        raise InvalidNameError(
            f"invalid {what} {name!r}: {problem}; use lowercase letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit (pattern {MODEL_NAME_PATTERN}), e.g. 'mnist-vae'"
        )
    return name


def sanitize_name(raw: str, what: str = "model name") -> str:
    """`raw` made a valid name: lowercased, each run of other characters turned into one '-', runs of
    '.' or '-' made single, '.' and '-' stripped from both ends, cut to the maximum length
    ("Genserve [::1]:8001" -> "genserve-1-8001"). InvalidNameError if nothing valid is left."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", raw.lower())
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", cleaned)).strip("._-")
    return validate_model_name(cleaned[:MAX_NAME_LENGTH], what)


def default_model_name(kind: str, dataset: str) -> str:
    """`<dataset>-<kind>`, sanitised (mnist-5k + vae -> mnist-5k-vae)."""
    return sanitize_name(f"{dataset}-{kind}")
