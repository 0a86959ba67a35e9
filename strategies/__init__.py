"""Split-learning methods (one class each) and the Flower strategy that drives them."""
