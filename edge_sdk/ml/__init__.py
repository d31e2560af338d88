"""Model-side helpers (torch, transformers, peft), imported lazily by their callers."""
