"""The web app and HTTP API (``imgclf serve``).

``create_app`` is imported on first use, so the CLI can read the serving
defaults in :mod:`imgclf.serve.limits` without importing FastAPI.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from imgclf.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'imgclf.serve' has no attribute '{name}'")
