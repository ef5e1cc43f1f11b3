"""Risk control on arrays (numpy and scipy only; never imports torch)."""
