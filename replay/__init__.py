"""bitstrace replay: a BITS upload client, the reference server, and the replayer."""
