"""The engine: the Ray actors that host the backbones and stream batches through them."""
