"""The OpenAI-compatible HTTP server and what it needs beside the engine."""
