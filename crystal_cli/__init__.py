"""crystal: generate stable inorganic crystals with a fine-tuned language model."""

__version__ = "0.1.0"
