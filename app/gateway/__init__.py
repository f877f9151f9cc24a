"""The gateway: Ollama's and OpenAI's HTTP APIs in front of the fleet.

Every inference request becomes an ``infer`` job on the same queues as ``infer.delay()``, so
it gets the same priorities, routing, retries and cache. ``corral gateway`` serves it;
``app.gateway.app.create_app`` builds the ASGI app.
"""
