"""The similar-case service: a Flask app over the index, fed by a PACS over DICOMweb (`medsim serve`).

    from medsim.server import Settings, create_app
    app = create_app(Settings(index="cxr-index", pacs_url="http://127.0.0.1:8042/dicom-web"))

Modules: ``settings`` (typed settings from flags, MEDSIM_* environment, TOML/JSON file), ``app`` (factory, waitress),
``state`` (shared index, model, PACS client, thumbnails), one module per API resource (``similar``, ``cases``,
``index``, ``health``), ``security`` (tokens, CORS, audit log), ``errors`` (JSON errors); operating points come
from :mod:`medsim.operating_point`.
See docs/api.md and the OpenAPI document (``/api/v1/openapi.yaml``).
"""

from medsim.server.settings import Settings, SettingsError


def create_app(settings: Settings, **kwargs):
    """See :func:`medsim.server.app.create_app` (imported lazily so the CLI does not load Flask to print help)."""
    from medsim.server.app import create_app as _create_app

    return _create_app(settings, **kwargs)


def serve(settings: Settings) -> None:
    from medsim.server.app import serve as _serve

    _serve(settings)


__all__ = ["Settings", "SettingsError", "create_app", "serve"]
