"""The dictionary service: for a dictionary's latents, similar latents by decoder cosine and the
neurons each reads from and writes to; for the neurons, the latents reading from and writing along
each one's output direction. Computed from the weights alone (compute.py), rendered by render.py."""
