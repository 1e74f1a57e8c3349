"""`qwen3 serve`: an OpenAI-compatible HTTP server over the engine (Starlette + uvicorn).

schema and tools are MLX-free; engine owns the model on one worker thread; app is HTTP.
"""
