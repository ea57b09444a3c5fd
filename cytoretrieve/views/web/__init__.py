"""The local web viewer: `app.create_app` (FastAPI) over `service.Viewer`; its page lives in `static/`."""
