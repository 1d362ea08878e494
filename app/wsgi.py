"""The WSGI entry point gunicorn loads in each worker (after fork)."""

import gc

from pipeline.embed import ModelUnavailable

from . import create_app

application = create_app()

try:  # load the model now, in this worker, so its first request does not wait for it
    application.extensions["distill"].embedder.dim()
except ModelUnavailable:
    pass  # already logged; requests that need the model get a 503

application.extensions["distill"].parser.start()  # the helper for big bodies, ready before they come

# What is loaded by now (the model, the libraries) lives as long as the worker:
# frozen, it is skipped by every later full garbage collection, which otherwise
# walked it on the event loop for ~0.1 s at a time.
gc.freeze()
