"""Errors the command line reports as one ``error:`` line instead of a traceback.

Library code raises ``ValueError`` subclasses whose message names the file,
key or field at fault (``ModelFileError``, ``DataError``, ``ConfigError``,
``UnsupportedModelError``). Set ``BITUNE_DEBUG=1`` to see the traceback.
"""
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)
