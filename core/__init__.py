"""What the API (``app/``) and the training worker (``worker/``) share: settings, typed records, the Redis
job store and its Lua scripts, leases, storage (the data folder, a bucket, the cache), the data layout,
leftovers, dispatch to Celery by task name, the weights folder, and the launcher (``ssd-service``).

``core`` imports only ``model`` (and third-party packages), never ``app`` or ``worker``; importing it
does not import the training code.
"""
