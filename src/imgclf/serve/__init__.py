"""The web app and HTTP API (``imgclf serve``)."""

from imgclf.serve.app import create_app

__all__ = ["create_app"]
