"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017 for small federations).

The server learns the sum of the round's (clipped, weight-premultiplied, fixed-point encoded) updates and
nothing else about any one of them. Pure library, no HTTP and no files: the HTTP server
(:mod:`fedllm.server.secure_rounds`), the client (:mod:`fedllm.client.secagg`) and the tests run the same
state machines (:mod:`.protocol`) on plain data.

* :mod:`.crypto` -- X25519 key agreement + HKDF-SHA256, AES-256-GCM for shares, AES-256-CTR as the mask PRG
  (all from the maintained ``cryptography`` package);
* :mod:`.shamir` -- Shamir secret sharing over the prime field GF(2^521 - 1);
* :mod:`.encoding` -- fixed-point encoding of an update into the ring Z_{2^bits}, and its error bound;
* :mod:`.graph` -- SecAgg+'s k-regular neighbour graph (the complete graph: SecAgg);
* :mod:`.protocol` -- the client's and the server's per-stage state machines;
* :mod:`.config` -- the ``--secure_aggregation`` options.

See docs/secure_aggregation.md for the protocol as run and the threat model.
"""
