"""Changes mii makes to a loaded Hugging Face model (attention function, fused projections)."""
