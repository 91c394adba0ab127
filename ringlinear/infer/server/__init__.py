"""OpenAI-compatible HTTP server on FastAPI + uvicorn: /v1/completions and /v1/chat/completions
(streamed over server-sent events or not), /v1/models, /health and Prometheus /metrics.

Every bad request gets a 4xx with an OpenAI error body naming the field, and fails alone; a client
that goes away has its requests aborted at once (their slots and pages are free after the current
step); beyond the running batch requests queue, and beyond `max_queued` more they get 503.

Modules: `app` (the factory, the served names and `serve`), `gate` (API key, body limit, shutdown
refusals, before any route), `routes` (the endpoints), `state` (what they share), `errors`
(OpenAI's error body and the handlers), `tokens` (prompts tokenized off the event loop),
`streaming` (submitting, collecting and streaming a request's outputs), `shutdown` (draining on
signals), `logprobs` and `protocol` (the request bodies).
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
