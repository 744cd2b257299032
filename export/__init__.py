"""genserve export."""
