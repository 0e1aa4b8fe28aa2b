"""taskfs: a remote compute task service as a filesystem.

The package is layered (see ``DESIGN.md`` section 2): ``api`` speaks the REST API, ``archive``
reads output ZIPs over HTTP ranges, ``fs`` is the filesystem, ``server`` the embedded local
service, ``cli`` the ``taskfs`` command.
"""

__version__ = "0.1.0"
