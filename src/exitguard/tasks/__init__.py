"""Tasks: build loss and cost tables for classification, segmentation, language, diffusion."""
