"""One module per implemented model family; each exports ``FAMILY`` (see ``models/registry.py``)."""
