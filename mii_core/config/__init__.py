"""Configuration models with DeepSpeed-MII's names, and keyword parsing."""
