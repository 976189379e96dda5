"""stemlive.live: everything downstream of the wire.

Protocol, transport, session files, analysis, pipeline service, viewer, tomography hand-off and the CLI.
"""

__version__ = "0.1.0"
