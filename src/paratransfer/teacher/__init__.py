"""The teacher as a source of weights: in memory, read lazily from safetensors, or streamed one
layer at a time; and model loading."""
