"""`echox serve`: a streaming speech API (FastAPI + uvicorn) and a web page, over one engine.

`echox.serve.app.create_app(engine, ServeConfig(...))` builds the ASGI app; `echox.serve.cli`
registers the command. The protocol is in docs/api.md.
"""
