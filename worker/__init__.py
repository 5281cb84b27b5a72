"""The training side of the service: the Celery app and task, the Redis job store, leases.

Importing ``worker`` (or ``worker.queue``, ``worker.store``, ``worker.settings``) does not
import the training code: only ``worker.tasks`` and ``worker.training`` do, in the worker.
"""
