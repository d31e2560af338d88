"""Training that only the server runs: server-side distillation, weighted SFT, sampling."""
