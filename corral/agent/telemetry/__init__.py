"""The agent's telemetry data path (DESIGN §6).

Building blocks, each usable on its own:

- :mod:`~corral.agent.telemetry.spool` — the store-and-forward spool: every batch is stored
  (durably, on disk) under a sequence number before it is sent, and deleted only when the server
  acknowledges that sequence number.
- :mod:`~corral.agent.telemetry.collectors` — system metrics of a real device (psutil).
- :mod:`~corral.agent.telemetry.simmetrics` — the same metric names, generated for ``corral sim``.
- :mod:`~corral.agent.telemetry.localsock` — custom metrics and events that applications on the
  device push over a local UNIX socket (``docs/app-metrics.md``).
"""
