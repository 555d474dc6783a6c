"""Serving trained models over HTTP: the Open Inference Protocol (v2), image files, a page.

``registry`` holds the loaded models, ``protocol`` speaks the inference protocol, ``app``
routes requests, ``hot`` answers the two routes that carry the load ahead of FastAPI, ``guard`` checks tokens and limits and logs every request, ``metrics``
counts for Prometheus, ``feedback`` takes corrections and ``learning`` learns from them,
``server`` binds and runs; ``static/`` is the page.
"""

from .app import create_app
from .registry import ServedModel, load_models
from .server import serve

__all__ = ["ServedModel", "create_app", "load_models", "serve"]
