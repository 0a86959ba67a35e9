"""The server side: the server segment, the event loop, who takes part, validation of replies,
aggregation, checkpoints, and the Flower strategy that ties them into rounds."""
