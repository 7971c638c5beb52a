"""Image processors: images to model inputs, model outputs to segments."""
