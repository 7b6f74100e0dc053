"""Sparse dictionaries (SAEs and transcoders): read and written in SAELens's format, trained
offline, and their latents computed by `sitegen compute --sae` as units of their own."""
