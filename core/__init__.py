"""What every floor shares, without torch: the model config, image/tokenizer/prompt processing,
sampling, the bundle format, the recipe table, the built-in data and atomic file writes."""
