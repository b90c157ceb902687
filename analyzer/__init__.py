"""bitstrace analyzer: captures -> TCP streams -> HTTP exchanges -> BITS sessions -> reports."""

__version__ = "0.1.0"
