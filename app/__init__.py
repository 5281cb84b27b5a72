"""The HTTP side of the service: the FastAPI app, its routers, upload admission and batched inference.

``app/`` enqueues training by task name (``core.dispatch``) and never imports the training code path.
"""
