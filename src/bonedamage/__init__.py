"""bonedamage: failed-vs-pristine bone tissue from SR-microCT scans.

Layers, in the order data flows (imports only point down this list):
``data`` (phantoms, volume I/O, manifest, ingest, tiling), ``learn``, ``lifecycle``,
``explain``, and ``cli`` on top.
"""

__version__ = "0.1.0"
