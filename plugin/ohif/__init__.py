"""The medsim OHIF plugin as package data (``medsim.ohif`` in an installed medsim; this folder in a checkout).

``src/`` holds the plugin's ES modules and CSS, exactly as the viewer loads them (and as ``npm pack`` here packs
them); ``fetch_viewer.py`` fetches the pinned prebuilt OHIF viewer (``ohif-viewer.json``). One copy of each file:
the wheel maps this folder to ``medsim.ohif`` (pyproject.toml, ``[tool.setuptools.package-dir]``).
"""
