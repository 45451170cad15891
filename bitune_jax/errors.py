"""Errors the command line reports as one ``error:`` line instead of a traceback.

Library code raises ``ValueError`` subclasses whose message names the file,
key or field at fault (``ModelFileError``, ``DataError``, ``ConfigError``,
``UnsupportedModelError``, ``OutputError``, ``CheckpointError``). ``OSError``
is there too (a file that vanished, a full disk): where the library writes, it
names the file itself (``fileio.OutputError``), elsewhere the system's message
usually does. Set ``BITUNE_DEBUG=1`` to see the traceback.
"""
USER_ERRORS = (ValueError, OSError)
