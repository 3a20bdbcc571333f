"""Row schemes: what one forward's rows are, on both sides of the transport.

The dispatcher owns the skeleton of a pipelined forward (counts, layout, streams, the plan's
stages, the final wait); a row scheme supplies its parts: the chunk layout the transport moves,
the rows placed into the transport's send rows, the experts' step on the received rows, and
the sum of the returned rows into the layer's output (``scheme.RowScheme``).

* ``per_pair``: one row per (token, expert), Megatron's scheme;
* ``dedup``: one row per (token, destination rank, chunk), expanded on the expert rank.
"""
