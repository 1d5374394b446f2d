"""replayd's version, in a module of its own: the package's `__init__` is the API's face (the top layer), so a module
the API imports (the connection names itself with the version, metrics export it) cannot import the package for it."""

__version__ = "0.1.0"
