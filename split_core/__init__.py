"""The shared core of split learning, below the strategy and the Flower apps.

Imports go one way: ``models`` -> ``split_core`` (config, data, payload, metering, compute,
training steps and methods) -> ``strategies`` (the server: segment, exchange, aggregation, the
Flower strategy) -> ``flower_app`` (ClientApp, ServerApp, simulation, tools). Nothing here
imports Flower's apps or the strategy, so every layer can be used and tested on its own.
"""
