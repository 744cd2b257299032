"""genserve serving."""
