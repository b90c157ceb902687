"""bitstrace analyzer: captures -> TCP streams -> HTTP exchanges -> BITS sessions -> reports."""
