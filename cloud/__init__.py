"""The cotune coordinator: FastAPI app, round state, strategies and the LLM holder."""
