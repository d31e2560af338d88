"""Server-side co-tuning strategies behind one small interface."""
