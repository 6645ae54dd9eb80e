"""Test worker that fails while importing."""

raise RuntimeError("broken worker: this import always fails")
