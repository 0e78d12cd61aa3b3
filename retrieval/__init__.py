"""Fine-grained image retrieval: open_clip encoders fine-tuned with Circle Loss."""

__version__ = "0.1.0"
