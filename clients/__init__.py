"""genserve clients."""
