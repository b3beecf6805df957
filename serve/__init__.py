"""`nanovlm serve`: an OpenAI-compatible server over the torch-free runtime (starlette + uvicorn)."""
