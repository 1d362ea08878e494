"""The WSGI entry point gunicorn loads in each worker (after fork)."""

from . import create_app

application = create_app()
