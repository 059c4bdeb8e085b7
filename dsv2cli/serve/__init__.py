"""`dsv2 serve`'s core: an OpenAI-compatible HTTP server with continuous batching over the latent cache.

``protocol.py`` (request checks, errors), ``answers.py`` (response and chunk documents), ``batch.py`` (rows
joining and leaving one latent cache), ``prefix_cache.py`` (earlier prompts' latent entries by blocks),
``scheduler.py`` (the loop that owns the model), ``model_thread.py`` (the one thread it and the loading run on), ``experts.py`` (expert-load records), ``metrics.py``
(Prometheus), ``app.py`` (FastAPI endpoints, uvicorn).
"""
