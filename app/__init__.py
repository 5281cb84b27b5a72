"""The HTTP side of the service: FastAPI app, routers, dataset import, batched inference.

``app/`` enqueues training by task name and never imports the training code path.
"""
