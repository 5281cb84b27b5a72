"""The Celery training worker: the app and its task, the job runner, the lease monitor, the reaper,
rebuilding Redis from the storage, and the pool of one worker per GPU.

Only ``worker.tasks`` and ``worker.job_runner`` import the training code (``model.training``).
"""
