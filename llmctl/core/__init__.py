"""The shared core every stage stands on: store, config, device, data, tokenizer, models, training."""
