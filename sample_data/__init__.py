"""The sample-data builder as package data (``medsim.sample_data`` in an installed medsim; this folder in a
checkout): ``python -m medsim.sample_data.build_sample_data`` or ``medsim stack --sample``. The generated
``pacs_export/`` and the download cache are never part of the package."""
