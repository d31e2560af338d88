"""Model-side code both the device and the server run (torch, transformers, peft), imported
lazily by their callers."""
