"""File input and output: images in, results out, always atomically."""
