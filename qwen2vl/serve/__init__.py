"""Serving: the OpenAI-compatible HTTP server, the web chat page, continuous batching and offline batch."""

from .errors import APIError
from .scheduler import Job, QueueFull, Scheduler

__all__ = ["APIError", "Job", "QueueFull", "Scheduler"]
