"""`vkpack serve`'s server: an OpenAI-compatible HTTP API over a continuous-batching scheduler.

The engine core never imports this package. Its modules, each with one job:

    batch.py       the scheduler thread: owns the engine, decodes every running sequence in one step
    parse.py       untrusted request bodies -> typed generation arguments, or an OpenAI-style ApiError
    jobs.py        one request's bridge to the scheduler: submit, relay events (JSON or SSE), cancel
    app.py         the Starlette routes, the API-key and body-size gate, create_app
    prometheus.py  GET /metrics: one prometheus_client registry per app, and the scheduler's latency histograms
    static/        chat.html, the chat page served at GET / (no build step; it calls the API above)
    runner.py      binding the socket, and BackgroundServer (uvicorn on a thread) for tests and tools
"""
