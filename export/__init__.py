"""Edge builds from tuned adapters (GGUF, ONNX); see DESIGN.md §6."""
