"""bitstrace: explain Microsoft BITS uploads from packet captures, and replay them.

The installed package holds the repository's top-level folders as subpackages:
`bitstrace.analyzer` (analyzer/) reads captures up to the BITS sessions and their reports,
`bitstrace.replay` (replay/) holds the client, the reference server and the replayer.
"""

__version__ = "0.1.0"
